"""The one batched scorer: a jitted per-row function over many examples, sharded over a mesh.

Evaluation (answer NLL, preference accuracy), DPO's reference precompute and SAMI's mutual
information bound all score many tokenised examples with one jitted function of
(params, batch). `score_examples` does it once for all of them: examples are sorted by length
and cut into batches whose row length is the smallest bucket that fits them (a power of two or
1.5 times one, at most `seq_len`: at most a third of a row is padding, and a handful of
shapes compile), so short examples do not pay for the longest; each batch's leading
axis is split over the mesh's batch axes exactly as the train step's batches are; the rows
come back in the examples' order. The host builds the next batches while the device scores
(results are fetched two batches behind).

jax.jit caches compilations per function object, so a score_fn made afresh for every call (a
closure over the model's config, a new functools.partial) compiles again on every call; build
it with `bind(fn, config, ...)` instead: equal arguments give the same object, so repeated
calls, and models with equal configs, share one compilation per batch shape.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from align_jax import sharding

# build(examples, *, batch_size, seq_len, pad_id) -> numpy batch, e.g. a DataFormat's `build`.
Builder = Callable[..., dict[str, np.ndarray]]


@functools.lru_cache(maxsize=256)
def _bound(fn, *args, **kwargs):
    return functools.partial(fn, *args, **kwargs)


def bind(fn: Callable, *args, **kwargs) -> functools.partial:
    """`functools.partial(fn, *args, **kwargs)`, the same object for equal arguments.

    Use it for `score_examples`' score_fn so that its compilations are reused across calls
    (see the module docstring). Arguments should be hashable (a ModelConfig is); with an
    unhashable one this is a fresh partial, which compiles on every call.
    """
    try:
        return _bound(fn, *args, **kwargs)
    except TypeError:  # unhashable arguments
        return functools.partial(fn, *args, **kwargs)


def _length(example) -> int:
    if hasattr(example, "prompts"):  # a SamiExample
        return max(len(p) for p in example.prompts) + max(len(r) for r in example.responses)
    return len(example.prompt) + max(len(c) for c in example.completions)


def _bucket(length: int, *, seq_len: int, min_bucket: int) -> int:
    """The smallest 2^k or 3 * 2^(k-1) >= length (and >= min_bucket), at most seq_len."""
    p = 1 << max(0, math.ceil(math.log2(max(length, 1))))
    if p >= 4 and length <= 3 * p // 4:
        p = 3 * p // 4
    return min(seq_len, max(min_bucket, p))


def _place_params(params, mesh: Mesh):
    """Params already laid out on `mesh` stay; anything else is replicated over it."""
    def one(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        return sharding.put(x, sharding.replicated(mesh))
    return jax.tree.map(one, params)


def score_examples(score_fn: Callable[[Any, dict], Any], params: Any, examples: Sequence[Any], *,
                   build: Builder, seq_len: int, batch_size: int = 8, pad_id: int = 0,
                   mesh: Mesh | None = None, rules: str | sharding.Rules = "dp",
                   min_bucket: int = 16, progress: str | None = None) -> np.ndarray:
    """Scores every example with `score_fn`, in batches bucketed by length, over `mesh`.

    Args:
      score_fn: `score_fn(params, batch) -> array [B, ...]`, one row per batch row (e.g. the
        summed log-probs of each sequence); jitted here (once per bucket shape, and once per
        process when it is the same object each call: a module-level function or `bind`).
      params: the model's parameters.
      examples: tokenised examples (`Example` or `SamiExample`) that `build` takes.
      build: padded batch builder `build(examples, *, batch_size, seq_len, pad_id)`.
      seq_len: the longest row; every example must fit it (truncate first).
      batch_size: rows per forward; rounded up to a multiple of the mesh's batch shards.
      pad_id: the padding token.
      mesh: the device mesh; None runs on the default device.
      rules: the sharding preset of the batch and the model's activations.
      min_bucket: the shortest row length used.
      progress: a tqdm description, or None for no bar.
    Returns:
      float array [len(examples), ...] in the examples' order.
    """
    if not examples:
        return np.zeros((0,), np.float32)
    batch_put = None
    if mesh is not None:
        batch_put = sharding.batch_sharding(mesh, rules, ndim=1)
        shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(batch_put.spec[0])
                           if a is not None)
        batch_size = -(-batch_size // shards) * shards
        params = _place_params(params, mesh)
    jitted = jax.jit(score_fn)
    lengths = [_length(ex) for ex in examples]
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        raise ValueError(f"score_examples: example {too_long[0]} has {lengths[too_long[0]]} "
                         f"tokens > seq_len {seq_len}")
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    starts = range(0, len(order), batch_size)
    if progress:
        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    out, pending = None, collections.deque()

    def fetch():
        nonlocal out
        idx, scored = pending.popleft()
        rows = np.asarray(sharding.fetch(scored))[:len(idx)]
        if out is None:
            out = np.zeros((len(examples),) + rows.shape[1:], rows.dtype)
        out[idx] = rows

    for start in starts:
        idx = order[start:start + batch_size]
        t = _bucket(max(lengths[i] for i in idx), seq_len=seq_len, min_bucket=min_bucket)
        batch = build([examples[i] for i in idx], batch_size=batch_size, seq_len=t,
                      pad_id=pad_id)
        if batch_put is not None:
            batch = sharding.put(batch, batch_put)
        with sharding.use_mesh(mesh, rules):
            pending.append((idx, jitted(params, batch)))  # dispatched; runs asynchronously
        if len(pending) > 2:
            fetch()
    while pending:
        fetch()
    return out
