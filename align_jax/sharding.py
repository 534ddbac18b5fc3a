"""The one place that names mesh axes and PartitionSpecs.

A mesh always has the axes ``('data', 'fsdp', 'tensor')``. Models name logical axes
(`align_jax.axes`); a *rule preset* maps each logical axis to mesh axes:

  dp       batch over (data, fsdp); parameters replicated.
  fsdp     batch over (data, fsdp); parameters sharded over fsdp on their embed axis, and
           mixture-of-experts weights over (fsdp, data) on their experts axis (expert
           parallelism: each device holds, and runs, a share of the experts).
  fsdp_tp  as fsdp, plus heads, kv_heads, mlp and vocab over tensor (Megatron-style).

`constrain` is how model code pins an activation's layout: it is the identity unless a
`use_mesh(mesh, rules)` context is active while tracing, so the same model code runs on one
CPU and on a pod.
"""

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from align_jax import axes

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_BATCH_AXES = ("data", "fsdp")
# Experts claim fsdp first, then data, as far as each divides the number of experts; a weight
# whose experts took fsdp leaves its embed axis whole.
_EXPERT_AXES = ("fsdp", "data")

RULES: dict[str, Rules] = {
    "dp": (
        (axes.BATCH, _BATCH_AXES),
    ),
    "fsdp": (
        (axes.BATCH, _BATCH_AXES),
        (axes.EXPERTS, _EXPERT_AXES),
        (axes.EMBED, "fsdp"),
    ),
    "fsdp_tp": (
        (axes.BATCH, _BATCH_AXES),
        (axes.EXPERTS, _EXPERT_AXES),
        (axes.EMBED, "fsdp"),
        (axes.HEADS, "tensor"),
        (axes.KV_HEADS, "tensor"),
        (axes.MLP, "tensor"),
        (axes.VOCAB, "tensor"),
    ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSpec:
    """Sizes of the ('data', 'fsdp', 'tensor') mesh axes; one of them may be -1 (the rest).

    Attributes:
      data: devices that split the batch (data parallel).
      fsdp: devices that split the batch and shard the parameters and optimizer state.
      tensor: devices that split each layer's heads and MLP (tensor parallel).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshSpec{tuple(sizes)}: at most one axis may be -1")
        known = math.prod(s for s in sizes if s != -1)
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshSpec{tuple(sizes)}: sizes must be positive or -1")
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"MeshSpec{tuple(sizes)}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"MeshSpec{tuple(sizes)} needs {math.prod(sizes)} devices, {num_devices} present")
        return tuple(sizes)


def make_mesh(spec: MeshSpec | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh over `devices` (default: all of them)."""
    spec = spec or MeshSpec()
    devices = list(devices if devices is not None else jax.devices())
    shape = spec.shape(len(devices))
    # Auto axis types: the sharding of intermediates is left to the compiler (GSPMD), guided by
    # the `constrain` calls in the model.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def get_rules(rules: str | Rules) -> Rules:
    if isinstance(rules, str):
        if rules not in RULES:
            raise ValueError(f"unknown sharding preset {rules!r}; choose one of {sorted(RULES)}")
        return RULES[rules]
    return tuple(rules)


def logical_to_spec(logical: Sequence[str | None], rules: str | Rules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    table: Mapping[str, Any] = dict(get_rules(rules))
    used: set[str] = set()
    out = []
    for name in logical:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        names = tuple(n for n in names if n not in used)
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def _fits(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension (e.g. 2 kv heads on a tensor axis of 4)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        kept, size = [], 1
        for n in names:
            if dim % (size * mesh.shape[n]) == 0:
                kept.append(n)
                size *= mesh.shape[n]
        out.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*out)


def named_sharding(logical: Sequence[str | None], mesh: Mesh, rules: str | Rules,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    spec = logical_to_spec(logical, rules)
    if shape is not None:
        spec = _fits(shape, spec, mesh)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: str | Rules) -> Any:
    """NamedShardings for a tree whose leaves are boxed (`nn.LogicallyPartitioned`) or plain.

    Boxed leaves are sharded by their logical names under `rules`; plain leaves (step counters,
    scalars) are replicated. The result has the *unboxed* tree structure, ready for
    `jax.jit(..., out_shardings=...)` of a function that returns unboxed values. For a whole
    TrainState (whose factored optimizer moments lose rank) use
    `train.state.train_state_shardings`.
    """

    def one(x):
        if _is_box(x):
            return named_sharding(x.names, mesh, rules, shape=x.value.shape)
        return replicated(mesh)

    return jax.tree.map(one, abstract_tree, is_leaf=_is_box)



def run_init(init, rng: jax.Array, abstract_tree: Any, *, mesh: Mesh | None = None,
             rules: str | Rules = "fsdp", optimize: bool = True) -> Any:
    """Runs `init(rng)` jitted, its outputs laid out by `tree_shardings` when `mesh` is given.

    optimize=False compiles it without XLA's backend optimisations: an init runs once, and on
    a CPU optimising the random draw of every parameter shape takes most of a small model's
    init time (about 1 s per shape); the values may then differ in the last bit.
    """
    if mesh is None:
        jitted = jax.jit(init)
    else:
        jitted = jax.jit(init, out_shardings=tree_shardings(abstract_tree, mesh, rules))
    if optimize:
        return jitted(rng)
    options = {"xla_backend_optimization_level": 0}
    return jitted.lower(rng).compile(compiler_options=options)(rng)

def put(tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) onto `shardings`, in one process or many.

    In one process this is `jax.device_put`. Across processes jax only places host data that
    it can check is equal everywhere (a collective per array), and not arrays already committed
    to a local device; here each process supplies its own devices' slices of its (equal) host
    copy, with no check, as `load_hf` does for checkpoints. PRNG key arrays are placed through
    their key data. Arrays already spread over several processes are resharded by
    `jax.device_put`. `shardings` is one sharding for every leaf or a matching tree.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), s),
                                            impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def fetch(tree: Any) -> Any:
    """Numpy copies of jax arrays on every process, also of arrays spread over several
    processes (gathered first; a collective that every process must call)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return x
    return jax.device_get(jax.tree.map(one, tree))


def batch_sharding(mesh: Mesh, rules: str | Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] input batch: batch split, everything else replicated."""
    return named_sharding((axes.BATCH,) + (None,) * (ndim - 1), mesh, rules)


_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "align_jax_sharding", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: str | Rules = "fsdp"):
    """While active (at trace time), `constrain` pins activations to `mesh` under `rules`."""
    if mesh is None:
        yield
        return
    # Only a context variable: constraints carry their mesh in a NamedSharding, so this works
    # inside jit tracing, where jax.set_mesh may not be entered.
    token = _CONTEXT.set((mesh, get_rules(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current() -> tuple[Mesh, Rules] | None:
    return _CONTEXT.get()


def _spec_first(shape: Sequence[int], logical: Sequence[str | None], rules: Rules, mesh: Mesh,
                first: Sequence[str]) -> PartitionSpec:
    """Like `_fits(shape, logical_to_spec(...))`, but the dims named in `first` claim their mesh
    axes before the others, and a mesh axis a dim cannot use (it does not divide it) is left
    for the next dim."""
    order = sorted(range(len(logical)), key=lambda i: logical[i] not in first)
    table: Mapping[str, Any] = dict(rules)
    used: set[str] = set()
    out: list[Any] = [None] * len(logical)
    for i in order:
        target = table.get(logical[i]) if logical[i] is not None else None
        if target is None:
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        spec = _fits((shape[i],), PartitionSpec(tuple(n for n in names if n not in used)), mesh)
        if spec[0] is not None:
            kept = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
            used.update(kept)
            out[i] = spec[0]
    return PartitionSpec(*out)


def constrain(x: jax.Array, logical: Sequence[str | None], *,
              first: Sequence[str] = ()) -> jax.Array:
    """Sharding constraint by logical names; the identity outside `use_mesh`.

    `first`: logical axes that claim their mesh axes before the others (e.g. the experts of a
    [B, E, C, D] buffer, so that the rows get only the batch axes the experts left).
    """
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if first:
        spec = _spec_first(x.shape, logical, rules, mesh, first)
    else:
        spec = _fits(x.shape, logical_to_spec(logical, rules), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_map_logical(fn, *, in_logical, out_logical, shapes):
    """`fn` run per shard under the active `use_mesh` context (plain `fn` outside one).

    For kernels the compiler cannot partition (Pallas). Axes that do not divide a dimension,
    like 2 kv heads on a tensor axis of 4, stay whole. The kv-heads and heads specs must split
    consistently; when they would not, heads stay whole too.
    """
    ctx = _CONTEXT.get()
    if ctx is None:
        return fn
    mesh, rules = ctx
    in_specs = tuple(_fits(shape, logical_to_spec(logical, rules), mesh)
                     for shape, logical in zip(shapes, in_logical))
    out_spec = _fits(shapes[0], logical_to_spec(out_logical, rules), mesh)
    if len(in_specs) > 1 and in_specs[0][2] != in_specs[1][2]:
        in_specs = tuple(PartitionSpec(*s[:2], None, *s[3:]) if len(s) == 4 else s
                         for s in in_specs)
        out_spec = PartitionSpec(*out_spec[:2], None, *out_spec[3:])
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)
