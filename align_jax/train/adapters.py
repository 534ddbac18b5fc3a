"""LoRA training: the trained params are the adapters, the frozen base rides in the state.

With LoRA on, `TrainState.params` holds the adapter weights (float32; the optimizer state
tracks only them) and `TrainState.ref_params` holds the frozen base, possibly in bfloat16. Like
any reference it is not checkpointed: it is rebuilt from the run's initial params on resume.
`bind_lora_loss` wraps an objective's step loss (`Objective.bind`) so it sees base + adapters
as its params; for objectives with a reference model it also gets the base itself as
`ref_params`, i.e. the same weights with the adapters off, scored in the same step with no
second copy of the model.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import optax

from align_jax import sharding
from align_jax.models import lora as lora_lib
from align_jax.models import transformer
from align_jax.models.config import ModelConfig
from align_jax.models.hf import config_from_hf, load_hf, save_hf
from align_jax.models.named import resolve_model_path
from align_jax.tokenizer import copy_tokenizer_files
from align_jax.train import compile as compile_lib
from align_jax.train import step as step_lib
from align_jax.train.state import TrainState, abstract_arrays, abstract_state, train_state_shardings

LORA_FILE = "lora.json"


def bind_lora_loss(loss, spec: lora_lib.LoraConfig, *, reference: bool):
    """`loss(adapter_weights, batch, *, rng, ref_params=base)` over base + adapters.

    Args:
      loss: the step's loss, `Objective.bind(...)` (params, batch, *, rng, ref_params).
      spec: the LoRA settings.
      reference: pass the base (adapters off) as the objective's reference params.
    Returns:
      the loss the train step differentiates with respect to the adapter weights only.
    """
    def wrapped(weights, batch, *, rng, ref_params):
        if ref_params is None:
            raise ValueError("LoRA training needs the frozen base in state.ref_params")
        base = jax.lax.stop_gradient(ref_params)
        # A stream of its own, so an objective's own use of `rng` draws the same numbers.
        drop = jax.random.fold_in(rng, 0x10A) if spec.dropout > 0.0 else None
        params = lora_lib.with_adapters(base, lora_lib.Adapters(weights=weights, spec=spec),
                                        dropout_rng=drop)
        return loss(params, batch, rng=rng, ref_params=base if reference else None)

    return wrapped


def abstract_run_state(config: ModelConfig, *, tx: optax.GradientTransformation,
                       lora: lora_lib.LoraConfig | None, with_ref: bool) -> TrainState:
    """The boxed abstract TrainState of a run: full params (+ a reference copy), or with LoRA
    the float32 adapters as params and the frozen base (in `lora.base_dtype`) as ref_params."""
    if lora is None:
        return abstract_state(transformer.abstract_params(config), tx=tx, with_ref=with_ref)
    return abstract_state(lora_lib.abstract_lora(config, lora), tx=tx,
                          abstract_ref=transformer.abstract_params(base_config(config, lora)))


def compiled_step_memory(config: ModelConfig, loss: step_lib.LossFn, *,
                         batch: dict[str, jax.ShapeDtypeStruct], tx: optax.GradientTransformation,
                         lora: lora_lib.LoraConfig | None = None, reference: bool = False,
                         mesh=None, rules: str = "fsdp"):
    """XLA's memory analysis of the compiled train step, from shapes alone (nothing runs and
    no weights exist): for comparing LoRA with full fine-tuning on configs of any size.

    Args:
      config: the model (param_dtype is the master dtype of full fine-tuning).
      loss: the step's loss, `Objective.bind(...)`.
      batch: ShapeDtypeStructs of one global batch.
      tx: the optimizer.
      lora: LoRA settings, or None for full fine-tuning.
      reference: full fine-tuning keeps a frozen reference copy; with LoRA the objective gets
        the base (adapters off) as its reference.
      mesh, rules: the mesh (default: one device) and sharding preset.
    Returns:
      `jax.stages.Compiled.memory_analysis()` (per device).
    """
    mesh = mesh or sharding.make_mesh(sharding.MeshSpec(data=1), devices=jax.devices()[:1])
    abstract = abstract_run_state(config, tx=tx, lora=lora, with_ref=reference)
    shardings = train_state_shardings(abstract, mesh, rules)
    if lora is not None:
        loss = bind_lora_loss(loss, lora, reference=reference)
    step = compile_lib.jit_train_step(loss=loss, tx=tx, schedule=None, grad_accum=1, mesh=mesh,
                                      rules=rules, state_shardings=shardings)
    placed = compile_lib.batch_shardings(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed) for k, v in batch.items()}
    with sharding.use_mesh(mesh, rules):
        lowered = step.jitted.lower(abstract_arrays(abstract, shardings), batch)
    return lowered.compile().memory_analysis()


def base_config(config: ModelConfig, spec: lora_lib.LoraConfig) -> ModelConfig:
    """The config whose param_dtype is the dtype the frozen base is held in."""
    return dataclasses.replace(config, param_dtype=spec.base_dtype or config.param_dtype)


def write_lora_file(model_dir: str, spec: lora_lib.LoraConfig, *, init_from: str | None,
                    seed: int) -> None:
    """`<run>/model/lora.json`: the adapter settings and where the base came from, so
    `align-jax convert` can rebuild the base for a merged or peft export of any checkpoint."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, LORA_FILE), "w") as f:
        json.dump({"lora": dataclasses.asdict(spec),
                   "base": {"init_from": os.path.abspath(init_from) if init_from else None,
                            "seed": seed}}, f, indent=1)


def read_lora_file(model_dir: str) -> tuple[lora_lib.LoraConfig, dict[str, Any]] | None:
    path = os.path.join(model_dir, LORA_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    try:
        return lora_lib.lora_config(data["lora"]), data["base"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a LoRA run description ({e})") from None


def rebuild_base(config: ModelConfig, spec: lora_lib.LoraConfig, base: dict[str, Any]) -> Any:
    """The frozen base of a LoRA run, as `train` built it (from `lora.json`'s "base")."""
    frozen = base_config(dataclasses.replace(config, param_dtype="float32"), spec)
    dtype = jax.numpy.dtype(frozen.param_dtype)
    if base.get("init_from"):
        _, params = load_hf(base["init_from"])
        return jax.tree.map(lambda x: x.astype(dtype), params)
    # The same key and dtype as the loop's random init (values do not depend on sharding).
    key = jax.random.split(jax.random.key(int(base["seed"])))[1]
    return transformer.init_params(frozen, key)


def write_peft_export(config: ModelConfig, adapters: lora_lib.Adapters, tmp: str, *,
                      final_dir: str, init_from: str | None, base_params=None,
                      tokenizer_dir: str | None = None) -> str:
    """A peft adapter dir that `peft.AutoPeftModelForCausalLM.from_pretrained` loads offline.

    `adapter_config.json` names the base as an absolute local folder: `init_from` resolved (a
    named model's converted dir included), or, for a base with no folder (random init), the
    base itself written into `<final_dir>/base`. The tokenizer files are copied in too.

    Args:
      config: the model.
      adapters: the trained adapters (host arrays).
      tmp: the folder being written (renamed to final_dir by the caller once complete).
      final_dir: where the export will live.
      init_from: the run's base dir or model name, or None.
      base_params: a callable returning the base params (host), used when init_from is None.
      tokenizer_dir: tokenizer files to copy (a dir or .model file).
    Returns:
      the base_model_name_or_path written.
    """
    if init_from:
        base = os.path.abspath(resolve_model_path(init_from))
    else:
        base = os.path.join(os.path.abspath(final_dir), "base")
        base_cfg = base_config(config, adapters.spec)
        save_hf(base_cfg, base_params(), os.path.join(tmp, "base"))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, os.path.join(tmp, "base"))
    lora_lib.save_peft(config, adapters, tmp, base_model_name_or_path=base)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp)
    return base


def peft_base_path(path: str) -> str | None:
    """The `base_model_name_or_path` of a peft adapter dir (None when it names none)."""
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"train_main.lora_from: {cfg_path} is missing; give a peft "
                                f"adapter dir (adapter_config.json + adapter_model.safetensors)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg_path}: not a peft adapter config ({e})") from None
    return base if isinstance(base, str) and base else None


def continue_from_peft(config: ModelConfig | None, path: str, given: Any, *,
                       init_from: str | None = None
                       ) -> tuple[lora_lib.LoraConfig, dict[str, Any]]:
    """(spec, adapter weights) to continue training the peft adapter at `path`.

    Rank, alpha, targets and rslora are the adapter's; `given` (train_main.lora, may be None)
    may set dropout and base_dtype, and where it sets the others they must agree. `config`
    None reads the base's from `init_from`'s config.json.
    """
    if config is None:
        if init_from is None:
            raise ValueError(f"train_main.lora_from: {path} names no base "
                             f"(base_model_name_or_path); set init_from or model")
        cfg_path = os.path.join(init_from, "config.json")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = config_from_hf(json.load(f), source=cfg_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{cfg_path}: cannot read the base's config ({e})") from None
    adapters = lora_lib.load_peft(config, path)
    spec = adapters.spec
    given = dict(given or {})
    for field in ("rank", "alpha", "targets", "rslora"):
        if field in given:
            want = getattr(lora_lib.lora_config({field: given[field]}), field)
            if want != getattr(spec, field):
                raise ValueError(f"train_main.lora[{field!r}]={given[field]!r} disagrees with "
                                 f"the adapter in {path} ({getattr(spec, field)!r}); leave it "
                                 f"out to continue the adapter as it is")
    spec = dataclasses.replace(spec, dropout=float(given.get("dropout", spec.dropout)),
                               base_dtype=given.get("base_dtype"))
    return spec, adapters.weights
