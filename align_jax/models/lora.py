"""LoRA: low-rank adapters beside a frozen decoder, merged into it, exported for `peft`.

An adapter on a projection W adds `scale * (x A) B`, A [in, R] and B [R, out], B initialised
to zero (so a fresh adapter changes nothing) and scale = alpha / R (alpha / sqrt(R) with
rslora). Adapters are a separate pytree stacked on the layers axis like the params:

  layers/attn/{q,k,v}_a  [L, D, R]     layers/attn/{q,k,v}_b  [L, R, N|K, H]
  layers/attn/o_a        [L, N, H, R]  layers/attn/o_b        [L, R, D]
  layers/mlp/{gate,up}_a [L, D, R]     layers/mlp/{gate,up}_b [L, R, F]
  layers/mlp/down_a      [L, F, R]     layers/mlp/down_b      [L, R, D]
  (a mixture of experts: one adapter per expert, e.g. layers/mlp/gate_a [L, E, D, R] and
   layers/mlp/gate_b [L, E, R, F])

They run through the same pure `transformer.forward`: pass `lora=adapters`, or pass
`with_adapters(params, adapters)` as the params (how losses see them, unchanged). The rank
axis is `axes.LORA_RANK`, which no sharding preset maps, so it stays replicated while the
other axes follow the params' rules.
"""

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from align_jax import axes
from align_jax.atomic import default_mode
from align_jax.models.config import ModelConfig
from align_jax.models.families import get_family

# target: (module, param name, weight letters, letters contracted with the input)
TARGETS: dict[str, tuple[str, str, str, str]] = {
    "q": ("attn", "q_proj", "DNH", "D"),
    "k": ("attn", "k_proj", "DKH", "D"),
    "v": ("attn", "v_proj", "DKH", "D"),
    "o": ("attn", "o_proj", "NHD", "NH"),
    "gate": ("mlp", "gate", "DF", "D"),
    "up": ("mlp", "up", "DF", "D"),
    "down": ("mlp", "down", "FD", "F"),
}
# A mixture of experts: the same targets with an experts axis E, which A and B share.
_EXPERT_TARGETS = {
    "gate": ("mlp", "gate", "EDF", "D"),
    "up": ("mlp", "up", "EDF", "D"),
    "down": ("mlp", "down", "EFD", "F"),
}
# peft's names for the same projections (`LoraConfig.target_modules`), accepted as targets;
# "all-linear" is every projection of the blocks (peft leaves the output head out, as we do).
PEFT_ALIASES: dict[str, tuple[str, ...]] = {
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
    "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
    "all-linear": tuple(TARGETS),
}
_LOGICAL = {"L": axes.LAYERS, "D": axes.EMBED, "N": axes.HEADS, "K": axes.KV_HEADS,
            "H": axes.HEAD_DIM, "F": axes.MLP, "R": axes.LORA_RANK, "E": axes.EXPERTS}


def _target(config: ModelConfig, target: str) -> tuple[str, str, str, str]:
    if config.num_experts and target in _EXPERT_TARGETS:
        return _EXPERT_TARGETS[target]
    return TARGETS[target]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """What to adapt and how.

    rank, alpha: the low rank R and the scale numerator (scale = alpha / R).
    targets: projections to adapt, among q, k, v, o, gate, up, down; peft's module names
      (q_proj, ..., down_proj, "all-linear") are accepted and stored as ours.
    dropout: dropout on the adapter's input while training (0: none).
    rslora: scale = alpha / sqrt(R) (rank-stabilised LoRA).
    base_dtype: the dtype the frozen base is held in while training (e.g. "bfloat16"); None
      keeps the config's param dtype. Adapters and their optimizer state stay float32.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0
    rslora: bool = False
    base_dtype: str | None = None

    def __post_init__(self):
        given = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in given if t not in TARGETS and t not in PEFT_ALIASES]
        if bad or not given:
            raise ValueError(f"LoraConfig.targets={self.targets!r}: choose among "
                             f"{tuple(TARGETS)} or peft's names {tuple(PEFT_ALIASES)}")
        ours = [o for t in given for o in PEFT_ALIASES.get(t, (t,))]
        object.__setattr__(self, "targets", tuple(dict.fromkeys(ours)))
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout}: must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_config(value: "LoraConfig | Mapping[str, Any] | None") -> "LoraConfig | None":
    """A LoraConfig from itself, a dict of its fields (gin), or None."""
    if value is None or isinstance(value, LoraConfig):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"lora={value!r}: give a dict of LoraConfig fields or a LoraConfig")
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"lora: unknown field(s) {unknown}; known: {sorted(fields)}")
    kw = dict(value)
    if "targets" in kw and not isinstance(kw["targets"], str):
        kw["targets"] = tuple(kw["targets"])
    return LoraConfig(**kw)


@flax.struct.dataclass
class Adapters:
    """LoRA weights (the tree in the module docstring, B unscaled) and their settings."""

    weights: dict[str, Any]
    spec: LoraConfig = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class LoraParams:
    """Frozen base params with adapters: accepted by `forward` wherever params go.

    dropout_rng: a key for adapter dropout (training); None runs deterministically.
    """

    base: Any
    adapters: Adapters
    dropout_rng: jax.Array | None = None


def with_adapters(params: Any, adapters: Adapters, *, dropout_rng: jax.Array | None = None
                  ) -> LoraParams:
    return LoraParams(base=params, adapters=adapters, dropout_rng=dropout_rng)


def _dims(config: ModelConfig) -> dict[str, int]:
    return {"L": config.num_layers, "D": config.embed_dim, "N": config.num_heads,
            "K": config.num_kv_heads, "H": config.head_dim, "F": config.mlp_dim,
            "E": config.num_experts}


def _letters(config: ModelConfig, target: str) -> tuple[str, str]:
    """Letters of A and B (without the layers axis); the experts axis E leads both."""
    _, _, w, contracted = _target(config, target)
    shared = "E" if "E" in w else ""
    rest = "".join(c for c in w if c not in contracted and c not in shared)
    return shared + contracted + "R", shared + "R" + rest


def _shapes(config: ModelConfig, spec: LoraConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """`<module>/<target>_<a|b>` -> (shape, letters incl. L) for every adapter tensor."""
    dims = {**_dims(config), "R": spec.rank}
    out = {}
    for t in spec.targets:
        module = _target(config, t)[0]
        for part, letters in zip("ab", _letters(config, t)):
            out[f"{module}/{t}_{part}"] = (tuple(dims[c] for c in "L" + letters), "L" + letters)
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {"layers": {}}
    for key, value in flat.items():
        module, name = key.split("/")
        tree["layers"].setdefault(module, {})[name] = value
    return tree


def lora_axes(config: ModelConfig, spec: LoraConfig) -> dict[str, Any]:
    """The logical axes of each adapter tensor (same tree as `Adapters.weights`)."""
    return _nest({k: tuple(_LOGICAL[c] for c in letters)
                  for k, (_, letters) in _shapes(config, spec).items()})


def abstract_lora(config: ModelConfig, spec: LoraConfig) -> dict[str, Any]:
    """The adapter weights as boxed ShapeDtypeStructs (float32); allocates nothing."""
    return _nest({k: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32),
                                             tuple(_LOGICAL[c] for c in letters))
                  for k, (shape, letters) in _shapes(config, spec).items()})


def init_lora_weights(config: ModelConfig, spec: LoraConfig, rng: jax.Array) -> dict[str, Any]:
    """Fresh float32 adapter weights: A uniform in +-1/sqrt(fan_in) (as peft), B zero."""
    flat = {}
    shapes = _shapes(config, spec)
    dims = _dims(config)
    keys = jax.random.split(rng, len(shapes))
    for key, (name, (shape, _)) in zip(keys, sorted(shapes.items())):
        if name.endswith("_b"):
            flat[name] = jnp.zeros(shape, jnp.float32)
            continue
        fan_in = math.prod(dims[c] for c in _target(config, name.split("/")[1][:-2])[3])
        bound = 1.0 / math.sqrt(fan_in)
        flat[name] = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    return _nest(flat)


def init_lora(config: ModelConfig, params: Any, *, rank: int, alpha: float,
              targets: Sequence[str], rng: jax.Array, dropout: float = 0.0,
              rslora: bool = False) -> Adapters:
    """Adapters for `params` (B zero-initialised, so the model is unchanged).

    Args:
      config: the model.
      params: its parameter tree (checked for the targeted projections).
      rank, alpha, targets, dropout, rslora: see `LoraConfig`.
      rng: key for A's initialisation.
    Returns:
      the Adapters (float32, on the default device; place them with `lora_axes`).
    """
    spec = LoraConfig(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora,
                      targets=targets if isinstance(targets, str) else tuple(targets))
    for t in spec.targets:
        module, name, _, _ = _target(config, t)
        if name not in params.get("layers", {}).get(module, {}):
            raise ValueError(f"init_lora: params have no layers/{module}/{name} for target {t!r} "
                             f"(a {config.family} model)")
    return Adapters(weights=init_lora_weights(config, spec, rng), spec=spec)


def lora_variables(adapters: Adapters) -> dict[str, Any]:
    """The `lora` flax collection the modules read: B pre-multiplied by the scale.

    Scaling B here rather than in the module is the same function of (A, B), so gradients
    match peft's `scale * B(A x)` exactly.
    """
    scale = adapters.spec.scale
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale if str(path[-1].key).endswith("_b") else x, adapters.weights)


def merge_lora(config: ModelConfig, params: Any, adapters: Adapters) -> Any:
    """Params with every adapter folded in: W + scale * A B (float32 sum, W's dtype).

    Args:
      config: the model.
      params: the base parameter tree (not modified).
      adapters: from `init_lora` or training.
    Returns:
      a new parameter tree with the same structure and dtypes.
    """
    spec = adapters.spec
    layers = {m: dict(v) for m, v in params["layers"].items()}
    for t in spec.targets:
        module, name, w_letters, _ = _target(config, t)
        a_letters, b_letters = _letters(config, t)
        w = layers[module][name]
        a = adapters.weights["layers"][module][f"{t}_a"]
        b = adapters.weights["layers"][module][f"{t}_b"]
        # Output letters in W's order: contracted then the rest, as W stores them.
        delta = jnp.einsum(f"L{a_letters},L{b_letters}->L{w_letters}",
                           a.astype(jnp.float32), b.astype(jnp.float32))
        layers[module][name] = (w.astype(jnp.float32) + spec.scale * delta).astype(w.dtype)
    return {**params, "layers": layers}


# --------------------------------------------------------------------------- peft export


def _factors(config: ModelConfig, members: list[str], host: Mapping, layer: int, *,
             rows_out: int | None, lora_rows) -> tuple[np.ndarray, np.ndarray]:
    """One layer's peft (A [R_m, in], B [out, R_m]) for the HF module that `members` (our
    targets) map to; R_m = R * len(members). A fused module (several of ours, or one of its
    parts) gets the members' adapters block-diagonally: member j's A rows j*R.., its B the
    columns j*R.. at its own output rows. With experts both carry a leading E axis."""
    experts = bool(config.num_experts) and "E" in _target(config, members[0])[2]
    a_parts, b_parts = [], []
    for t in members:
        module = _target(config, t)[0]
        a = np.asarray(host["layers"][module][f"{t}_a"][layer], np.float32)
        b = np.asarray(host["layers"][module][f"{t}_b"][layer], np.float32)
        lead = a.shape[:1] if experts else ()
        r = a.shape[-1]
        # Contracted dims flattened in order (N*H for o), as the HF input dim.
        a_parts.append(np.swapaxes(a.reshape(*lead, -1, r), -1, -2))
        b_parts.append(np.swapaxes(b.reshape(*lead, r, -1), -1, -2))
    a_m = np.concatenate(a_parts, axis=-2)
    if rows_out is None:
        return a_m, b_parts[0]
    lead = a_m.shape[:-2]
    r = a_parts[0].shape[-2]
    b_m = np.zeros((*lead, rows_out, r * len(members)), np.float32)
    for j, (t, b_t) in enumerate(zip(members, b_parts)):
        b_m[..., lora_rows[t], j * r:(j + 1) * r] = b_t
    return a_m, b_m


def save_peft(config: ModelConfig, adapters: Adapters, path: str | os.PathLike, *,
              base_model_name_or_path: str | None = None) -> None:
    """Writes `adapter_model.safetensors` and `adapter_config.json` that `peft` loads.

        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        model = peft.PeftModel.from_pretrained(model, path)

    Module names come from the family table (`families.Family.lora`). Where transformers
    fuses projections we adapt separately (GPT-2's c_attn, GPT-NeoX's query_key_value,
    Mixtral's per-expert gate_up_proj), the fused module gets one adapter of rank
    R x (our targets in it), block-diagonal, so it adds exactly the same update
    (`rank_pattern` and `alpha_pattern` keep its scale). Mixtral's experts are adapted
    through peft's `target_parameters` (one A and B per expert); peft supports no dropout
    there, so it is written as 0 (it only matters for training).

    Args:
      config: the model the adapters belong to.
      adapters: the adapters (float32 on export).
      path: output dir (created).
      base_model_name_or_path: recorded in the config for peft's convenience.
    """
    spec = adapters.spec
    family = get_family(config.family, source=f"save_peft: ModelConfig.family={config.family!r}")
    host = jax.device_get(adapters.weights)
    groups: dict[str, list[str]] = {}
    for t in spec.targets:
        if t not in family.lora:
            raise ValueError(f"save_peft: a {config.family} model has no LoRA target {t!r} "
                             f"(it has {sorted(family.lora)})")
        groups.setdefault(family.lora[t].name, []).append(t)
    lora_rows = {t: m.rows(config) for t, m in family.lora.items() if m.rows is not None}
    modules = [n for n, ts in groups.items() if family.lora[ts[0]].parameter is None]
    parameters = [n for n in groups if n not in modules]
    # peft nests one wrapper per adapted parameter of a module, the first listed innermost.
    wrap = {p: ".base_layer" * sum(q.rsplit(".", 1)[0] == p.rsplit(".", 1)[0]
                                   for q in parameters[k + 1:])
            for k, p in enumerate(parameters)}
    tensors, ranks = {}, {}
    for name, members in groups.items():
        m = family.lora[members[0]]
        fused = [t for t, o in family.lora.items() if o.name == name and o.rows is not None]
        rows_out = sum(len(lora_rows[t]) for t in fused) if fused else None
        ranks[name] = spec.rank * len(members)
        for i in range(config.num_layers):
            a_m, b_m = _factors(config, members, host, i, rows_out=rows_out,
                                lora_rows=lora_rows)
            if m.parameter is not None:
                # peft's per-expert layout: A rows e*R_m + j, B columns j*E + e.
                e, r_m = a_m.shape[0], a_m.shape[1]
                a_m = a_m.reshape(e * r_m, -1)
                b_m = b_m.transpose(1, 2, 0).reshape(b_m.shape[1], r_m * e)
            pre = f"base_model.model.{family.layer_prefix.format(i=i)}{m.module}"
            pre += wrap.get(name, "")
            tensors[f"{pre}.lora_A.weight"] = np.ascontiguousarray(a_m)
            tensors[f"{pre}.lora_B.weight"] = np.ascontiguousarray(b_m)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    default_mode(os.path.join(path, "adapter_model.safetensors"))
    every = {o.module for o in family.lora.values() if o.parameter is None}
    last = [mod.rsplit(".", 1)[-1] for mod in every]
    # The last name suffices unless another module of the family ends the same (GPT-2 c_proj).
    target_modules = sorted(mod.rsplit(".", 1)[-1] if last.count(mod.rsplit(".", 1)[-1]) == 1
                            else mod for mod in modules)
    scale_for = lambda r: spec.scale * (math.sqrt(r) if spec.rslora else r)  # noqa: E731
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
        "lora_alpha": spec.alpha, "lora_dropout": 0.0 if parameters else spec.dropout,
        "use_rslora": spec.rslora, "target_modules": target_modules,
        "bias": "none", "fan_in_fan_out": family.conv1d, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    if parameters:
        cfg["target_parameters"] = parameters
    extra = {name: r for name, r in ranks.items() if r != spec.rank}
    if extra:
        cfg["rank_pattern"] = extra
        cfg["alpha_pattern"] = {name: scale_for(r) for name, r in extra.items()}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


# --------------------------------------------------------------------------- peft import


def load_peft(config: ModelConfig, path: str | os.PathLike) -> Adapters:
    """Reads a peft LoRA adapter dir (`save_peft`'s, or peft's own) as Adapters of `config`.

    The inverse of `save_peft` for modules adapted one to one (every family's separate
    projections); fused modules (GPT-2's c_attn, GPT-NeoX's query_key_value) and experts are
    refused, as are adapters with per-module ranks or alphas, biases or modules_to_save.

    Args:
      config: the base model the adapters were trained on.
      path: the dir with adapter_config.json and adapter_model.safetensors.
    Returns:
      Adapters (float32 host arrays), their LoraConfig read from adapter_config.json.
    Raises:
      ValueError naming the file and field when the adapter cannot be read as ours.
    """
    from safetensors.numpy import load_file  # local: only imports read adapter files

    path = os.fspath(path)
    cfg_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing; lora_from needs a peft adapter dir "
                                    f"(adapter_config.json + adapter_model.safetensors)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: field 'peft_type' must be 'LORA'")
    for field, ok in (("bias", cfg.get("bias", "none") == "none"),
                      ("modules_to_save", not cfg.get("modules_to_save")),
                      ("target_parameters", not cfg.get("target_parameters")),
                      ("use_dora", not cfg.get("use_dora"))):
        if not ok:
            raise ValueError(f"{cfg_path}: field {field!r}={cfg.get(field)!r} is not supported "
                             f"(plain LoRA on the projections only)")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg_path}: fields 'r' and 'lora_alpha' must be numbers, got "
                         f"{rank!r} and {alpha!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise ValueError(f"{cfg_path}: field {field!r}={cfg[field]!r}: per-module ranks or "
                             f"alphas are not supported (one rank and alpha for every target)")
    family = get_family(config.family, source=f"load_peft: ModelConfig.family={config.family!r}")
    tensors = load_file(weights_path)
    targets, used = [], set()
    for t, m in family.lora.items():
        key = f"base_model.model.{family.layer_prefix.format(i=0)}{m.module}.lora_A.weight"
        if key not in tensors:
            continue
        if m.rows is not None or m.parameter is not None or (config.num_experts and
                                                              t in _EXPERT_TARGETS):
            raise ValueError(f"{weights_path}: {m.name} is a fused or expert module; lora_from "
                             f"reads adapters on separate projections only")
        targets.append(t)
    if not targets:
        raise ValueError(f"{weights_path}: no LoRA weights on the {config.family} projections "
                         f"({', '.join(sorted({m.module for m in family.lora.values()}))})")
    spec = LoraConfig(rank=rank, alpha=float(alpha), targets=tuple(targets),
                      dropout=float(cfg.get("lora_dropout") or 0.0),
                      rslora=bool(cfg.get("use_rslora", False)))
    dims = {**_dims(config), "R": rank}
    flat = {}
    for t in targets:
        module, _, w, contracted = _target(config, t)
        a_letters, b_letters = _letters(config, t)
        m = family.lora[t]
        a_layers, b_layers = [], []
        for i in range(config.num_layers):
            pre = f"base_model.model.{family.layer_prefix.format(i=i)}{m.module}"
            a_key, b_key = f"{pre}.lora_A.weight", f"{pre}.lora_B.weight"
            if a_key not in tensors or b_key not in tensors:
                raise ValueError(f"{weights_path}: {a_key} or {b_key} is missing")
            a, b = tensors[a_key], tensors[b_key]
            used.update((a_key, b_key))
            a_shape = tuple(dims[c] for c in a_letters)
            b_shape = tuple(dims[c] for c in b_letters)
            if a.shape != (rank, math.prod(a_shape) // rank) or \
                    b.shape != (math.prod(b_shape) // rank, rank):
                raise ValueError(f"{weights_path}: {pre} has A {a.shape} and B {b.shape}; "
                                 f"a rank-{rank} adapter of this model has "
                                 f"A {(rank, math.prod(a_shape) // rank)} and "
                                 f"B {(math.prod(b_shape) // rank, rank)}")
            a_layers.append(np.asarray(a, np.float32).T.reshape(a_shape))
            b_layers.append(np.asarray(b, np.float32).T.reshape(b_shape))
        flat[f"{module}/{t}_a"] = np.stack(a_layers)
        flat[f"{module}/{t}_b"] = np.stack(b_layers)
    extra = sorted(k for k in tensors if k not in used)
    if extra:
        raise ValueError(f"{weights_path}: {len(extra)} tensors are not on the {config.family} "
                         f"projections this model adapts, e.g. {extra[0]}")
    return Adapters(weights=_nest(flat), spec=spec)
