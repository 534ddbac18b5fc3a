"""`align-jax plan`: the per-device memory of a training run, before any weight exists.

Two sources, both from abstract values (`jax.ShapeDtypeStruct`; nothing full-size allocated):

* arithmetic on `jax.eval_shape` of the real TrainState: the bytes of params, optimizer state,
  gradients (float32, one per param) and a frozen reference, each divided as its sharding on
  the mesh divides it;
* XLA's buffer assignment for the real compiled train step (`.lower().compile()
  .memory_analysis()`): arguments + outputs - donated aliases + temporaries. The temporaries are
  the activations, the gradients and the optimizer's scratch; this is the figure the verdict
  uses when it is available.

A mesh bigger than this host's device count is planned by arithmetic only (the step cannot be
compiled for devices that do not exist); on CPU,
`XLA_FLAGS=--xla_force_host_platform_device_count=N` gives N fake devices to compile for.
The compiled figure is the CPU backend's buffer assignment for the same program; a GPU or
TPU compiler fuses differently, so treat it as an estimate within tens of percent there
(fusion usually lowers it), and keep the headroom below.

With `lora`, the state is what `train` builds for LoRA (`train.adapters`): the float32
adapters are the trained params (with their optimizer state and gradients), and the frozen
base, in `lora.base_dtype`, is reported as the reference params (the objective's reference
when it needs one: no second copy).
"""

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding

from align_jax import sharding
from align_jax.losses import objectives
from align_jax.models import lora as lora_lib
from align_jax.models.config import ModelConfig, get_config
from align_jax.models.hf_config import config_from_hf
from align_jax.train import adapters as adapters_lib
from align_jax.train import compile as compile_lib
from align_jax.train.optim import OptimizerConfig, make_optimizer
from align_jax.train.state import train_state_shardings

GiB = 1024 ** 3
# Memory per device, in bytes, as the vendor states it.
ACCELERATORS: dict[str, int] = {
    "tpu-v4": 32 * GiB, "tpu-v5e": 16 * GiB, "tpu-v5p": 95 * GiB, "tpu-v6e": 32 * GiB,
    "a100-40gb": 40 * GiB, "a100-80gb": 80 * GiB, "h100-80gb": 80 * GiB, "h200": 141 * 10 ** 9,
}
# Kept free for the runtime, fragmentation and compiler differences. On CPU, a real step of the
# tiny model grew the resident set by 2% (4 x 512 tokens) to 22% (16 and 32 x 512) more than
# the compiled buffer assignment (tests/train/memory_probe.py), so a fifth is kept free.
HEADROOM = 0.20
# method: (registered objective, batch layout, keeps a frozen reference copy)
METHODS: dict[str, tuple[Any, str, bool]] = {
    "sft": ("sft", "tokens", False),
    "dpo": ("dpo", "pairs", False),          # precomputed reference log-probs
    "dpo_frozen": ("dpo", "pairs", True),    # a frozen copy of the params
    "sami": ("sami", "sami", False),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Per-device bytes of one training step (see the module docstring for the sources)."""

    method: str
    batch_size: int
    seq_len: int
    mesh: dict[str, int]
    params: int
    opt_state: int
    grads: int
    ref_params: int
    batch: int
    # LoRA: params are the adapters, ref_params the frozen base.
    lora: bool = False
    # From the compiled step (None when it was not compiled).
    compiled_arguments: int | None = None
    compiled_outputs: int | None = None
    compiled_aliased: int | None = None
    compiled_temp: int | None = None
    note: str = ""

    @property
    def state(self) -> int:
        return self.params + self.opt_state + self.ref_params

    @property
    def compiled_total(self) -> int | None:
        if self.compiled_temp is None:
            return None
        return (self.compiled_arguments + self.compiled_outputs - self.compiled_aliased
                + self.compiled_temp)

    @property
    def activations(self) -> int | None:
        """Temporaries beyond the gradients: activations kept for the backward and scratch."""
        if self.compiled_temp is None:
            return None
        return max(0, self.compiled_temp - self.grads)

    @property
    def lower_bound(self) -> int:
        """State, batch and gradients: what any step needs before a single activation."""
        return self.state + self.batch + self.grads

    @property
    def total(self) -> int:
        return self.compiled_total if self.compiled_total is not None else self.lower_bound

    def fits(self, accelerator: str) -> tuple[bool, str]:
        """(fits, reason) on one device of `accelerator` (a key of ACCELERATORS)."""
        if accelerator not in ACCELERATORS:
            raise ValueError(f"unknown accelerator {accelerator!r}; choose one of "
                             f"{sorted(ACCELERATORS)}")
        cap = ACCELERATORS[accelerator]
        usable = cap * (1 - HEADROOM)
        if self.lower_bound > usable:
            return False, (
                f"params {_gib(self.params)} + optimizer state {_gib(self.opt_state)} + "
                f"gradients {_gib(self.grads)}"
                + (f" + reference {_gib(self.ref_params)}" if self.ref_params else "")
                + f" alone need {_gib(self.lower_bound)} per device, over the "
                f"{_gib(usable)} usable of {accelerator}'s {_gib(cap)}: shard the state over "
                "more devices (fsdp), use LoRA, or a smaller model")
        if self.compiled_total is None:
            return True, (f"state and gradients need {_gib(self.lower_bound)} of "
                          f"{_gib(usable)}; activations not compiled ({self.note})")
        if self.compiled_total > usable:
            return False, (
                f"the compiled step needs {_gib(self.compiled_total)} per device (activations "
                f"and scratch {_gib(self.activations)}), over the {_gib(usable)} usable of "
                f"{accelerator}'s {_gib(cap)}: lower the batch, use grad_accum, remat or a "
                "smaller seq_len")
        return True, f"the compiled step needs {_gib(self.compiled_total)} of {_gib(usable)}"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(state=self.state, total=self.total, activations=self.activations,
                   lower_bound=self.lower_bound, compiled_total=self.compiled_total)
        return out


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def abstract_batch(method: str, *, batch_size: int, seq_len: int,
                   num_constitutions: int = 2) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch the method's loader yields, as ShapeDtypeStructs (global shapes)."""
    if method not in METHODS:
        raise ValueError(f"plan: unknown method {method!r}; choose one of {sorted(METHODS)}")
    layout = METHODS[method][1]
    lead = {"tokens": (batch_size,), "pairs": (batch_size, 2),
            "sami": (batch_size, num_constitutions, num_constitutions)}[layout]
    shape = (*lead, seq_len)
    i32 = lambda s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    batch = {"tokens": i32(shape), "targets": i32(shape), "segment_ids": i32(shape),
             "positions": i32(shape), "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32)}
    if method == "dpo":
        batch["ref_logps"] = jax.ShapeDtypeStruct((batch_size, 2), jnp.float32)
    return batch


def _per_device(tree: Any, shardings: Any) -> int:
    def one(x, s):
        return math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    return int(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))


def _mesh(spec: sharding.MeshSpec, num_devices: int):
    """A real mesh when this host has the devices, else an AbstractMesh (arithmetic only)."""
    if num_devices <= len(jax.devices()):
        return sharding.make_mesh(spec, devices=jax.devices()[:num_devices]), True
    shape = spec.shape(num_devices)
    return AbstractMesh(shape, ("data", "fsdp", "tensor")), False


def plan_memory(config: ModelConfig, *, method: str = "sft", batch_size: int, seq_len: int,
                mesh_spec: sharding.MeshSpec | None = None, num_devices: int | None = None,
                rules: str = "fsdp", optimizer: OptimizerConfig | None = None,
                grad_accum: int = 1, loss_kwargs: Mapping[str, Any] | None = None,
                lora: lora_lib.LoraConfig | Mapping[str, Any] | None = None,
                compile: bool = True) -> MemoryPlan:
    """Plans one train step of `config` under `method` (see METHODS) on a mesh.

    Args:
      config: the model (param_dtype is taken as float32, like `train`'s master weights).
      method: "sft", "dpo" (precomputed reference), "dpo_frozen" or "sami".
      batch_size: global rows per step (pairs for DPO, queries for SAMI).
      seq_len: tokens per row.
      mesh_spec: the mesh axes; default all devices on `data`.
      num_devices: devices of the mesh; default this host's count.
      rules: the sharding preset.
      optimizer: default AdamW.
      grad_accum: microbatches per step.
      loss_kwargs: extra keyword arguments of the objective.
      lora: LoRA settings (a LoraConfig or a dict of its fields), or None for full training.
      compile: also compile the step (needs num_devices real devices).
    Returns:
      the MemoryPlan.
    """
    loss_fn, _, with_ref = METHODS[method] if method in METHODS else (None, None, None)
    batch = abstract_batch(method, batch_size=batch_size, seq_len=seq_len)
    config = dataclasses.replace(config, param_dtype="float32")
    num_devices = num_devices or len(jax.devices())
    spec = mesh_spec or sharding.MeshSpec()
    mesh, real = _mesh(spec, num_devices)
    tx, schedule = make_optimizer(optimizer or OptimizerConfig(), num_steps=1000)
    lora = lora_lib.lora_config(lora)
    # With LoRA the base always rides in the state (as the reference when one is needed).
    abstract = adapters_lib.abstract_run_state(config, tx=tx, lora=lora,
                                               with_ref=with_ref or lora is not None)
    shardings = train_state_shardings(abstract, mesh, rules)
    arrays = nn.unbox(abstract)
    batch_sh = NamedSharding(mesh, compile_lib.batch_shardings(mesh, rules).spec) if real \
        else NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules))
    shards = math.prod(batch_sh.mesh.shape[a] for a in jax.tree.leaves(batch_sh.spec[0])
                       if a is not None) if batch_sh.spec else 1
    if batch_size % (shards * grad_accum):
        raise ValueError(f"plan: batch_size={batch_size} is not divisible by the {shards} batch "
                         f"shards of mesh {dict(batch_sh.mesh.shape)} x grad_accum={grad_accum}")
    params_b = _per_device(arrays.params, shardings.params)
    grads_b = _per_device(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                       arrays.params), shardings.params)
    fields = dict(
        method=method, batch_size=batch_size, seq_len=seq_len,
        mesh=dict(zip(("data", "fsdp", "tensor"), spec.shape(num_devices))), params=params_b,
        opt_state=_per_device(arrays.opt_state, shardings.opt_state), grads=grads_b,
        ref_params=0 if arrays.ref_params is None else _per_device(arrays.ref_params,
                                                                    shardings.ref_params),
        batch=_per_device(batch, jax.tree.map(lambda _: batch_sh, batch)), lora=lora is not None)
    if not compile:
        return MemoryPlan(**fields, note="compile=False")
    if not real:
        return MemoryPlan(**fields, note=(
            f"the step needs {num_devices} devices to compile, this host has "
            f"{len(jax.devices())}; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{num_devices}"))
    def compiled_memory(abstract, shardings):
        return lower_train_step(config, loss_fn=loss_fn, batch=batch, tx=tx, schedule=schedule,
                                mesh=mesh, rules=rules, abstract=abstract, shardings=shardings,
                                grad_accum=grad_accum, loss_kwargs=loss_kwargs, lora=lora,
                                lora_reference=with_ref).compile().memory_analysis()

    mem = compiled_memory(abstract, shardings)
    temp = int(mem.temp_size_in_bytes)
    note = f"compiled for {jax.default_backend()}"
    if (jax.default_backend() == "cpu" and lora is not None
            and lora.base_dtype in ("bfloat16", "float16")):
        # The CPU backend has no half-precision matmuls: it converts a bfloat16 base to
        # float32 and hoists the converts out of the layer loop, a float32 copy of the whole
        # base that a TPU or GPU never makes (mixtral_8x7b on 4 devices, 4 x 128 tokens:
        # 46.0 GiB of temporaries, 2.8 GiB with the base in float32). The temporaries are
        # taken from the same step with a float32 base; arguments keep the real dtypes.
        f32 = dataclasses.replace(lora, base_dtype=None)
        abstract32 = adapters_lib.abstract_run_state(config, tx=tx, lora=f32, with_ref=True)
        temp = int(compiled_memory(abstract32, train_state_shardings(
            abstract32, mesh, rules)).temp_size_in_bytes)
        note += (f"; temporaries of the same step on a float32 base (the CPU compiler's "
                 f"float32 copy of a {lora.base_dtype} base is left out)")
    return MemoryPlan(**fields, compiled_arguments=int(mem.argument_size_in_bytes),
                      compiled_outputs=int(mem.output_size_in_bytes),
                      compiled_aliased=int(mem.alias_size_in_bytes), compiled_temp=temp,
                      note=note)


def device_memory() -> tuple[int, str]:
    """(bytes one local device can hold, what the figure is): the accelerator's own limit, or on
    CPU the host's RAM shared by its devices (all of it, not what other processes leave free
    now: a refusal must not depend on the machine's load)."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory stats (CPU)
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind}'s {_gib(stats['bytes_limit'])}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    count = jax.local_device_count()
    return total // count, (f"the host's RAM {_gib(total)} over {count} "
                            f"device{'s' * (count > 1)}")


def check_train_memory(config: ModelConfig, *, objective: str, frozen_reference: bool,
                       batch_size: int, seq_len: int, mesh_spec: sharding.MeshSpec | None,
                       rules: str, optimizer: OptimizerConfig | None,
                       lora: lora_lib.LoraConfig | None) -> MemoryPlan:
    """Refuses a run whose state, gradients and batch alone (no activation counted, so never a
    false refusal) exceed what a local device holds; returns the plan otherwise.

    Raises:
      ValueError: one line with the numbers and what to change.
    """
    method = {"dpo": "dpo_frozen" if frozen_reference else "dpo", "sami": "sami"}.get(
        objective, "sft")
    # The state's shapes do not depend on the schedule (whose checks need the run's steps);
    # grad_accum changes only the activations, which this bound leaves out (and the train step
    # does not need microbatches divisible by the mesh, which plan_memory would ask).
    opt = dataclasses.replace(optimizer or OptimizerConfig(), warmup_steps=0, warmup_ratio=0.0,
                              decay_steps=None)
    plan = plan_memory(config, method=method, batch_size=batch_size, seq_len=seq_len,
                       mesh_spec=mesh_spec, rules=rules, optimizer=opt, lora=lora,
                       compile=False)
    capacity, what = device_memory()
    if plan.lower_bound > capacity:
        raise ValueError(
            f"train_main: batch_size={batch_size} x seq_len={seq_len} needs at least "
            f"{_gib(plan.lower_bound)} per device before any activation (params "
            f"{_gib(plan.params)}, optimizer state {_gib(plan.opt_state)}, gradients "
            f"{_gib(plan.grads)}, reference {_gib(plan.ref_params)}, batch {_gib(plan.batch)}), "
            f"over {what}: lower batch_size or seq_len, shard over more devices, or use LoRA "
            "(`align-jax plan` for the whole estimate)")
    return plan


def lower_train_step(config: ModelConfig, *, loss_fn, batch: Mapping[str, jax.ShapeDtypeStruct],
                     tx, schedule, mesh, rules: str, abstract, shardings, grad_accum: int = 1,
                     loss_kwargs: Mapping[str, Any] | None = None,
                     lora: lora_lib.LoraConfig | None = None, lora_reference: bool = False):
    """The real jitted train step (as `train` builds it) lowered on abstract inputs.

    `loss_fn` is a registered objective's name or an `objectives.Objective`; with `lora` the
    loss sees base + adapters (`lora_reference`: the base is also its reference).
    """
    loss = objectives.get_objective(loss_fn).bind(config=config, options=loss_kwargs)
    if lora is not None:
        loss = adapters_lib.bind_lora_loss(loss, lora, reference=lora_reference)
    step_fn = compile_lib.jit_train_step(
        loss=loss, tx=tx, schedule=schedule, grad_accum=grad_accum, mesh=mesh, rules=rules,
        state_shardings=shardings)
    batch_sh = compile_lib.batch_shardings(mesh, rules)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.unbox(abstract), shardings)
    batch_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
                for k, v in batch.items()}
    with sharding.use_mesh(mesh, rules):
        return step_fn.jitted.lower(state_in, batch_in)


def format_plan(plan: MemoryPlan, accelerators: list[str]) -> str:
    """A short human-readable table and one verdict line per accelerator."""
    rows = [("LoRA adapters" if plan.lora else "params", plan.params),
            ("optimizer state", plan.opt_state), ("gradients", plan.grads),
            ("frozen base" if plan.lora else "reference params", plan.ref_params),
            ("batch", plan.batch), ("activations + scratch", plan.activations),
            ("total (compiled)" if plan.compiled_total else "lower bound", plan.total)]
    lines = [f"{plan.method}: batch {plan.batch_size} x {plan.seq_len}, mesh {plan.mesh}",
             *(f"  {name:<24}{_gib(n):>14}" for name, n in rows)]
    if plan.note:
        lines.append(f"  ({plan.note})")
    for acc in accelerators:
        ok, why = plan.fits(acc)
        lines.append(f"  {acc}: {'fits' if ok else 'does NOT fit'}: {why}")
    return "\n".join(lines)


def plan_main(*, model: str, method: str = "sft", batch_size: int = 8, seq_len: int = 2048,
              mesh: sharding.MeshSpec | None = None, num_devices: int | None = None,
              rules: str = "fsdp", optimizer: OptimizerConfig | None = None,
              model_overrides: Mapping[str, Any] | None = None, grad_accum: int = 1,
              lora: Mapping[str, Any] | None = None,
              accelerators: tuple[str, ...] = tuple(ACCELERATORS), compile: bool = True,
              output_dir: str | None = None) -> int:
    """Prints the plan and a verdict per accelerator; writes plan.json to output_dir if set.

    Args:
      model: a preset name or a Hugging Face checkpoint dir (only its config.json is read).
      method: "sft", "dpo" (precomputed reference), "dpo_frozen" or "sami".
      batch_size: global rows per step (pairs for DPO, queries for SAMI).
      seq_len: tokens per row.
      mesh: the mesh axes; default all devices on `data`.
      num_devices: devices of the mesh; default this host's count.
      rules: the sharding preset ("dp", "fsdp", "fsdp_tp").
      optimizer: the optimizer whose state is counted; default AdamW.
      grad_accum: microbatches per step.
      lora: LoRA settings (fields of `LoraConfig`), or None for full training.
      compile: also compile the step and read XLA's numbers (needs num_devices real devices).
      model_overrides: ModelConfig fields to replace (e.g. {"remat": "full"}).
      accelerators: the accelerators to judge against (keys of ACCELERATORS).
      output_dir: where plan.json goes (optional).
    Returns:
      0 when the plan fits every named accelerator, else 1.
    """
    config = load_model_config(model)
    if model_overrides:
        config = dataclasses.replace(config, **model_overrides)
    plan = plan_memory(config, method=method, batch_size=batch_size, seq_len=seq_len,
                       mesh_spec=mesh, num_devices=num_devices, rules=rules,
                       optimizer=optimizer, grad_accum=grad_accum, lora=lora,
                       compile=compile)
    print(format_plan(plan, list(accelerators)))
    verdicts = {a: plan.fits(a) for a in accelerators}
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "plan.json"), "w") as f:
            json.dump({**plan.to_json(), "fits": {a: {"fits": ok, "reason": why}
                                                  for a, (ok, why) in verdicts.items()}},
                      f, indent=1)
    return 0 if all(ok for ok, _ in verdicts.values()) else 1


@functools.cache
def load_model_config(model: str) -> ModelConfig:
    """A preset's config, or an HF checkpoint dir's (only its config.json is read)."""
    if os.path.isdir(model):
        with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
            return config_from_hf(json.load(f), source=os.path.join(model, "config.json"))
    return get_config(model)
