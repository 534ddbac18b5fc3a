"""Auxiliary training losses a model's forward produces, handed to the train step.

A mixture-of-experts forward also yields its router's load-balancing loss
(`moe.aux_metrics`). Objectives never see it: they call `transformer.forward` (through
`losses.logprobs`) and return their own loss. The train step instead runs the objective
inside `collect(params)`, and every forward of exactly those params (matched by the identity
of their leaves: the tracers being differentiated, or a LoRA run's adapters) records its
weighted auxiliary loss and metrics there; the step adds the losses to the objective's and
reports the metrics (`Collected.apply`). A frozen reference's forward, or one under
`stop_gradient`, runs on other arrays and records nothing; outside `collect` (evaluation,
generation, reference log-probs) recording is a no-op; a dense model records nothing, so its
step is exactly what it was.
"""

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Collected:
    """What the forwards inside one `collect` recorded."""

    trained: frozenset[int] | None
    losses: list[jax.Array] = dataclasses.field(default_factory=list)
    metrics: list[Mapping[str, jax.Array]] = dataclasses.field(default_factory=list)
    # Forwards with auxiliary outputs on params other than the trained ones (a reference).
    others: int = 0

    def apply(self, loss: jax.Array, metrics: Mapping[str, jax.Array]
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss + the recorded weighted losses, metrics + their metrics, each a mean over
        the recorded forwards); unchanged when nothing was recorded."""
        if not self.losses:
            if self.others:
                raise ValueError(
                    "a mixture-of-experts forward ran on params other than the trained ones, "
                    "and none on the trained ones: its router loss cannot be attributed (does "
                    "the objective transform the params before calling the model?)")
            return loss, dict(metrics)
        out = dict(metrics)
        for key in self.metrics[0]:
            out[key] = sum(m[key] for m in self.metrics) / len(self.metrics)
        return loss + sum(self.losses), out


_ACTIVE: contextvars.ContextVar[Collected | None] = contextvars.ContextVar(
    "align_jax_auxiliary", default=None)


def _leaf_ids(tree: Any) -> set[int]:
    return {id(x) for x in jax.tree.leaves(tree)}


@contextlib.contextmanager
def collect(trained: Any) -> Iterator[Collected]:
    """While active (at trace time), forwards of `trained` record their auxiliary losses.

    Args:
      trained: the params being differentiated (any pytree; its leaves are matched by
        identity); None records every forward.
    Yields:
      the Collected record, filled as the forwards run.
    """
    record_ = Collected(trained=None if trained is None else frozenset(_leaf_ids(trained)))
    token = _ACTIVE.set(record_)
    try:
        yield record_
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    return _ACTIVE.get() is not None


def record(params: Any, *, loss: jax.Array, metrics: Mapping[str, jax.Array]) -> None:
    """Records one forward's weighted auxiliary loss if `params` (the forward's params and
    adapters, any pytree) holds a trained leaf; a no-op outside `collect`."""
    current = _ACTIVE.get()
    if current is None:
        return
    if current.trained is None or _leaf_ids(params) & current.trained:
        current.losses.append(jnp.asarray(loss, jnp.float32))
        current.metrics.append({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})
    else:
        current.others += 1
