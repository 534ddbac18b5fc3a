"""How one checkpoint tensor maps onto our parameter tree: the records and the layouts.

Each family (`align_jax.models.families`) lists its checkpoint as `Tensor`s. A tensor fills
one slice of one of our arrays, or, when the checkpoint fuses several of our projections
(GPT-2's c_attn, GPT-NeoX's query_key_value), one slice of each of several (its `targets`).
Our arrays are stacked on leading axes (layers, and experts for a mixture of experts); a
target's `index` says where on them its slice sits.

Layouts (torch Linear stores [out, in]; we store [in, out] with the heads split out):
  reshape     the same numbers in our shape (biases, norms, GPT-2's Conv1D [in, out])
  transpose   [out, in] -> [in, out]
  heads_in    [N*H, D] -> [D, N, H]              (q/k/v projections)
  heads_out   [D, N*H] -> [N, H, D]              (the attention output projection)
  split_last  [..., sum of parts] -> the parts   (GPT-2 c_attn: [D, 3*N*H] -> q, k, v)
  neox_qkv    [N*3*H, D] -> q, k, v [D, N, H]    (GPT-NeoX: heads outermost, then q/k/v)
  neox_qkv_bias  [N*3*H] -> q, k, v [N, H]
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from align_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    """A slice of one of our arrays."""

    path: tuple[str, ...]
    index: tuple[int, ...] = ()      # on the stacked axes: (), (layer,) or (layer, expert)
    stacked: tuple[int, ...] = ()    # their sizes: (), (L,) or (L, E)
    shape: tuple[int, ...]           # the slice's shape

    @property
    def full_shape(self) -> tuple[int, ...]:
        return (*self.stacked, *self.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tensor:
    """One checkpoint tensor and the slices of our arrays it fills."""

    hf_key: str
    hf_shape: tuple[int, ...]
    layout: str
    targets: tuple[Target, ...]


def _split_last(x: np.ndarray, t: Tensor) -> list[np.ndarray]:
    lead = math.prod(t.hf_shape[:-1])
    sizes = [math.prod(g.shape) // lead for g in t.targets]
    parts = np.split(x, np.cumsum(sizes)[:-1], axis=-1)
    return [p.reshape(g.shape) for p, g in zip(parts, t.targets)]


def _neox(x: np.ndarray, t: Tensor) -> list[np.ndarray]:
    n, h = t.targets[0].shape[-2:] if t.layout == "neox_qkv" else t.targets[0].shape
    parts = x.reshape(n, 3, h, -1)
    if t.layout == "neox_qkv":
        return [parts[:, j].transpose(2, 0, 1) for j in range(3)]
    return [parts[:, j, :, 0] for j in range(3)]


def to_ours(x: np.ndarray, t: Tensor) -> list[np.ndarray]:
    """The checkpoint tensor `x` as our slices, one per target."""
    g = t.targets[0]
    if t.layout == "reshape":
        return [x.reshape(g.shape)]
    if t.layout == "transpose":
        return [x.T]
    if t.layout == "heads_in":  # [N*H, D] -> [D, N, H]
        return [x.reshape(g.shape[1], g.shape[2], g.shape[0]).transpose(2, 0, 1)]
    if t.layout == "heads_out":  # [D, N*H] -> [N, H, D]
        return [x.reshape(g.shape[2], g.shape[0], g.shape[1]).transpose(1, 2, 0)]
    if t.layout == "split_last":
        return _split_last(x, t)
    if t.layout in ("neox_qkv", "neox_qkv_bias"):
        return _neox(x, t)
    raise ValueError(f"unknown tensor layout {t.layout!r}")


def to_hf(ys: list[np.ndarray], t: Tensor) -> np.ndarray:
    """Our slices (one per target) as the checkpoint tensor."""
    y = ys[0]
    if t.layout == "transpose":
        y = y.T
    elif t.layout == "heads_in":  # [D, N, H] -> [N*H, D]
        y = y.transpose(1, 2, 0)
    elif t.layout == "heads_out":  # [N, H, D] -> [D, N*H]
        y = y.transpose(2, 0, 1)
    elif t.layout == "split_last":
        y = np.concatenate([p.reshape(*t.hf_shape[:-1], -1) for p in ys], axis=-1)
    elif t.layout == "neox_qkv":  # 3 x [D, N, H] -> [N, 3, H, D]
        y = np.stack([p.transpose(1, 2, 0) for p in ys], axis=1)
    elif t.layout == "neox_qkv_bias":
        y = np.stack(ys, axis=1)
    return np.ascontiguousarray(y).reshape(t.hf_shape)


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise KeyError(f"params have no {'/'.join(path)} (missing {key!r})")
        tree = tree[key]
    return tree


def place(buffers: dict[tuple[str, ...], np.ndarray], t: Tensor, x: np.ndarray,
          dtype: np.dtype) -> None:
    """Writes checkpoint tensor `x` (already shape-checked) into the host buffers of its
    targets, allocating each stacked buffer on first use."""
    for g, part in zip(t.targets, to_ours(x, t)):
        part = part.astype(dtype, copy=False)
        if not g.stacked:
            buffers[g.path] = np.ascontiguousarray(part)
            continue
        if g.path not in buffers:
            buffers[g.path] = np.empty(g.full_shape, dtype)
        buffers[g.path][g.index] = part


class Layout:
    """Builds a family's tensor list: `top` for unstacked tensors, `layer` for a layer's,
    and helpers for the pieces several families share (norms, attention, Linear, the head)."""

    def __init__(self, config: ModelConfig, prefix: str):
        self.config, self.prefix, self.out = config, prefix, []

    def top(self, key, path, hf_shape, shape, layout="reshape"):
        self.out.append(Tensor(hf_key=key, hf_shape=hf_shape, layout=layout,
                               targets=(Target(path=path, shape=shape),)))

    def layer(self, i, key, paths, hf_shape, shapes, layout="reshape", expert=None):
        """Layer i's tensor `key`; `paths`/`shapes` one entry per target (fused: several)."""
        if isinstance(paths[0], str):
            paths, shapes = (paths,), (shapes,)
        index, stacked = (i,), (self.config.num_layers,)
        if expert is not None:
            index, stacked = (i, expert), (self.config.num_layers, self.config.num_experts)
        targets = tuple(Target(path=("layers", *p), index=index, stacked=stacked, shape=s)
                        for p, s in zip(paths, shapes))
        self.out.append(Tensor(hf_key=self.prefix.format(i=i) + key, hf_shape=hf_shape,
                               layout=layout, targets=targets))

    def norm(self, i, key, path):
        d = self.config.embed_dim
        self.layer(i, f"{key}.weight", (path, "scale"), (d,), (d,))
        if self.config.norm == "layer":
            self.layer(i, f"{key}.bias", (path, "bias"), (d,), (d,))

    def top_norm(self, key, path):
        d = self.config.embed_dim
        self.top(f"{key}.weight", (path, "scale"), (d,), (d,))
        if self.config.norm == "layer":
            self.top(f"{key}.bias", (path, "bias"), (d,), (d,))

    def attention(self, i, prefix, *, o_name):
        """Separate q/k/v projections `{prefix}.{q,k,v}_proj` and `{prefix}.{o_name}`."""
        c = self.config
        d, n, k, h = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
        for name, heads in (("q", n), ("k", k), ("v", k)):
            self.layer(i, f"{prefix}.{name}_proj.weight", ("attn", f"{name}_proj"),
                       (heads * h, d), (d, heads, h), "heads_in")
            if c.qkv_bias:
                self.layer(i, f"{prefix}.{name}_proj.bias", ("attn", f"{name}_bias"),
                           (heads * h,), (heads, h))
        self.layer(i, f"{prefix}.{o_name}.weight", ("attn", "o_proj"), (d, n * h), (n, h, d),
                   "heads_out")
        if c.out_bias:
            self.layer(i, f"{prefix}.{o_name}.bias", ("attn", "o_bias"), (d,), (d,))

    def linear(self, i, key, path, d_in, d_out, bias):
        """A torch Linear [out, in] (+ bias) -> ours [in, out]."""
        self.layer(i, f"{key}.weight", path, (d_out, d_in), (d_in, d_out), "transpose")
        if bias:
            self.layer(i, f"{key}.bias", path[:-1] + (path[-1] + "_bias",), (d_out,), (d_out,))

    def head(self, key="lm_head"):
        c = self.config
        if not c.tie_embeddings:
            self.top(f"{key}.weight", ("lm_head",), (c.vocab_size, c.embed_dim),
                     (c.embed_dim, c.vocab_size), "transpose")
        if c.head_bias:
            self.top(f"{key}.bias", ("lm_head_bias",), (c.vocab_size,), (c.vocab_size,))
