"""A bounded cache of compiled programs: `jax.jit`, with at most N programs kept (LRU).

`jax.jit` keeps every program it compiles for the life of its function: a server that sees a
new prompt length, budget or shared-prefix length compiles a new prefill and decode program
for it and never lets them go, so its memory grows with the number of distinct shapes it has
seen (not with the load). Here each distinct call signature (the static arguments, and the
shape, dtype, weak type and sharding of every array argument) gets its own `jax.jit` of a fresh
wrapper of the function, so that dropping it drops its program and everything jax cached for
it (jax's internal caches hold their functions weakly). The signatures share one process-wide
LRU of `max_programs()` entries; None (the default) keeps every program, as `jax.jit` does.
`align-jax serve` sets it (`max_compiled_shapes`).
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable, Sequence

import jax
import numpy as np

_LOCK = threading.Lock()
# (cache, signature) -> the jitted wrapper of that signature, least recently used first.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_LIMIT: list[int | None] = [None]
_EVICTIONS = [0]


def set_max_programs(n: int | None) -> None:
    """Keeps at most `n` compiled programs (all `ShapeCache`s together); None: no bound.

    Raises:
      ValueError: n is not None or a positive int.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"max_compiled_shapes must be a positive int or None, got {n!r}")
    with _LOCK:
        _LIMIT[0] = n
        _evict()


def max_programs() -> int | None:
    """The bound set by `set_max_programs` (None: unbounded)."""
    return _LIMIT[0]


def stats() -> dict[str, int]:
    """{"programs": signatures cached now, "evictions": signatures dropped so far}."""
    with _LOCK:
        return {"programs": len(_PROGRAMS), "evictions": _EVICTIONS[0]}


def cached_functions() -> list:
    """The jitted wrappers cached now (tests read their `_cache_size()`)."""
    with _LOCK:
        return list(_PROGRAMS.values())


def _evict() -> None:
    limit = _LIMIT[0]
    while limit is not None and len(_PROGRAMS) > limit:
        _PROGRAMS.popitem(last=False)
        _EVICTIONS[0] += 1


def _leaf_key(x):
    if isinstance(x, jax.Array):
        return ("a", x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding)
    if isinstance(x, np.ndarray | np.generic):
        return ("n", x.shape, x.dtype)
    return ("p", type(x))  # a Python scalar: traced as a weakly typed abstract value


class ShapeCache:
    """`jax.jit(fun, static_argnames=..., donate_argnames=...)` whose programs live in the
    bounded LRU above; call it like the jitted function (static arguments by keyword)."""

    def __init__(self, fun: Callable, *, static_argnames: Sequence[str] = (),
                 donate_argnames: Sequence[str] = ()):
        self.fun, self.static = fun, tuple(static_argnames)
        self.donate = tuple(donate_argnames)
        functools.update_wrapper(self, fun)

    def _jit(self):
        fun = self.fun

        @functools.wraps(fun)
        def fresh(*args, **kwargs):  # a new function object per signature: see the module
            return fun(*args, **kwargs)

        return jax.jit(fresh, static_argnames=self.static, donate_argnames=self.donate)

    def __call__(self, *args, **kwargs):
        static = tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static))
        dynamic = {k: v for k, v in kwargs.items() if k not in self.static}
        leaves, tree = jax.tree.flatten((args, dynamic))
        key = (id(self), static, tree, tuple(_leaf_key(x) for x in leaves))
        with _LOCK:
            jitted = _PROGRAMS.get(key)
            if jitted is None:
                jitted = _PROGRAMS[key] = self._jit()
                _evict()
            else:
                _PROGRAMS.move_to_end(key)
        return jitted(*args, **kwargs)
