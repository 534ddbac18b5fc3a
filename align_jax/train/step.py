"""The train step: `step(state, batch) -> (state, metrics)`, a pure module-level function.

The objective is the only thing that changes between methods. The step takes its loss in one
calling convention, `loss(params, batch, *, rng, ref_params)` (what
`align_jax.losses.objectives.Objective.bind` returns); `train_step` differentiates it with
respect to `params` only, accumulating gradients over microbatches in float32 inside the step.
`align_jax.train.compile` is where it is jitted.

A model whose forward has an auxiliary training loss (a mixture of experts' router
load-balancing loss) adds it here, not in the objective: the loss runs inside
`models.auxiliary.collect`, and every forward of the differentiated params contributes its
weighted loss (`router_aux_loss_coef` x `router_aux_loss`) to the step's loss and its metrics
(`router_aux_loss`, `moe_dropped_fraction`). Dense models contribute nothing.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from align_jax import axes, sharding
from align_jax.models import auxiliary
from align_jax.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


def _split_microbatches(x: jax.Array, num: int) -> jax.Array:
    """[B, ...] -> [num, B // num, ...], microbatch i holding rows i, i + num, i + 2 num, ...

    Interleaving keeps every microbatch spread over all the batch shards: a contiguous split
    would put each microbatch on a fraction of the devices.
    """
    b = x.shape[0]
    if b % num:
        raise ValueError(f"batch size {b} is not divisible by grad_accum={num}")
    x = x.reshape((b // num, num) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return sharding.constrain(x, (None, axes.BATCH) + (None,) * (x.ndim - 2))


def _loss_and_grads(loss: LossFn, params, batch, rng, ref_params):
    def total(p):
        with auxiliary.collect(p) as collected:
            value, metrics = loss(p, batch, rng=rng, ref_params=ref_params)
        return collected.apply(value, metrics)

    (value, metrics), grads = jax.value_and_grad(total, has_aux=True)(params)
    return value, dict(metrics), grads


def accumulate_gradients(loss: LossFn, params: Any, batch: Mapping[str, jax.Array], *,
                         rng: jax.Array, ref_params: Any = None, grad_accum: int = 1
                         ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Mean loss, metrics and gradients over `grad_accum` equal microbatches of `batch`.

    Gradients are summed in float32 under `lax.scan`, so only one microbatch's activations are
    live at a time. An objective that is a mean over scored units reports their count (a
    metric in `WEIGHT_METRICS`: tokens for SFT, pairs for DPO); microbatches are then weighted
    by it, so the result equals the full-batch gradient even when masks are uneven. Without
    such a metric each microbatch counts equally.

    Args:
      loss: the step's loss (`Objective.bind`).
      params: the parameters to differentiate.
      batch: arrays with a leading batch axis divisible by grad_accum.
      rng: the step's key; microbatch i draws from `fold_in(rng, i)`.
      ref_params: frozen reference parameters or None.
      grad_accum: the number of microbatches.
    Returns:
      (loss, metrics, grads) with grads in float32.
    """
    if grad_accum == 1:
        value, metrics, grads = _loss_and_grads(
            loss, params, batch, jax.random.fold_in(rng, 0), ref_params)
        return value, metrics, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    micro = jax.tree.map(lambda x: _split_microbatches(x, grad_accum), dict(batch))

    def body(acc, xs):
        i, mb = xs
        value, metrics, grads = _loss_and_grads(
            loss, params, mb, jax.random.fold_in(rng, i), ref_params)
        w = _weight(metrics)
        acc = jax.tree.map(lambda a, g: a + w * g.astype(jnp.float32), acc, grads)
        return acc, (value, metrics, w)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    acc, (values, metrics, weights) = jax.lax.scan(
        body, zeros, (jnp.arange(grad_accum, dtype=jnp.int32), micro))
    total = jnp.maximum(jnp.sum(weights), 1e-12)
    grads = jax.tree.map(lambda a: a / total, acc)
    metrics = {k: jnp.sum(m, axis=0) if k in WEIGHT_METRICS
               else jnp.sum(m * weights.reshape((-1,) + (1,) * (m.ndim - 1)), axis=0) / total
               for k, m in metrics.items()}
    return jnp.sum(values * weights) / total, metrics, grads


# Counts of scored units that objectives report; the first present weights microbatches.
WEIGHT_METRICS = ("num_tokens", "num_pairs", "num_examples")


def _weight(metrics: Mapping[str, jax.Array]) -> jax.Array:
    for name in WEIGHT_METRICS:
        if name in metrics:
            return jnp.asarray(metrics[name], jnp.float32)
    return jnp.float32(1.0)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, loss: LossFn,
               tx: optax.GradientTransformation, schedule: optax.Schedule | None = None,
               grad_accum: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update.

    Args:
      state: the current state.
      batch: the global batch (arrays with a leading batch axis).
      loss: the step's loss (`Objective.bind`).
      tx: the optimizer.
      schedule: the learning-rate schedule, reported as `learning_rate`.
      grad_accum: microbatches per step.
    Returns:
      (new state, metrics): the objective's metrics plus loss, grad_norm (before clipping),
      update_norm, param_norm (of the new params) and learning_rate, all float32 scalars.
    """
    rng = jax.random.fold_in(state.key(), state.step)
    value, metrics, grads = accumulate_gradients(
        loss, state.params, batch, rng=rng, ref_params=state.ref_params, grad_accum=grad_accum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out.update(
        loss=value.astype(jnp.float32),
        grad_norm=optax.global_norm(grads).astype(jnp.float32),
        update_norm=optax.global_norm(updates).astype(jnp.float32),
        # Of the new params: a finite value here certifies the state about to be checkpointed.
        param_norm=optax.global_norm(params).astype(jnp.float32),
    )
    if schedule is not None:
        out["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, out


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, loss: LossFn
              ) -> dict[str, jax.Array]:
    """The step's loss and metrics on `batch` at `state.params`, without gradients.

    The same loss as `train_step` (auxiliary losses included), the same key (the state's
    step folded in, microbatch 0) and the same reference; nothing is updated.

    Args:
      state: the state to score.
      batch: a global batch.
      loss: the loss to evaluate (`Objective.bind`; with LoRA, bound without dropout).
    Returns:
      the objective's metrics and `loss`, float32 scalars.
    """
    rng = jax.random.fold_in(jax.random.fold_in(state.key(), state.step), 0)
    with auxiliary.collect(state.params) as collected:
        value, metrics = loss(state.params, batch, rng=rng, ref_params=state.ref_params)
    value, metrics = collected.apply(value, metrics)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out["loss"] = jnp.asarray(value, jnp.float32)
    return out
