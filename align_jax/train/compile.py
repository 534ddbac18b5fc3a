"""Where the train step, the eval step and the state init are jitted (the only jax.jit of
each).

`jit_train_step` compiles `step.train_step` once, with the state's shardings in and out, the
batch split over the batch mesh axes, and the state donated. The returned callable enters
`sharding.use_mesh` on every call, so the model's `constrain` calls see the mesh at trace time
and the jit cache key stays the same from call to call.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from align_jax import sharding
from align_jax.train import step as step_lib
from align_jax.train.state import TrainState, init_state

StepFn = Callable[[TrainState, Mapping[str, jax.Array]],
                  tuple[TrainState, dict[str, jax.Array]]]


def batch_shardings(mesh: Mesh, rules: str | sharding.Rules) -> NamedSharding:
    """One sharding for every batch array: leading axis over the batch mesh axes, rest replicated.

    A PartitionSpec shorter than the array's rank replicates the remaining axes, so the same
    sharding fits [B, T], [B, P, T] and [B, C, C, T] arrays.
    """
    return sharding.batch_sharding(mesh, rules, ndim=1)


def jit_train_step(*, loss: step_lib.LossFn, tx: optax.GradientTransformation,
                   schedule: optax.Schedule | None, grad_accum: int, mesh: Mesh,
                   rules: str | sharding.Rules, state_shardings: TrainState) -> StepFn:
    """Compiles `train_step` for this run.

    Args:
      loss: the step's loss (`Objective.bind`).
      tx: the optimizer.
      schedule: its learning-rate schedule (reported in the metrics).
      grad_accum: microbatches per step.
      mesh: the device mesh.
      rules: the sharding preset or rule table.
      state_shardings: from `state.train_state_shardings`.
    Returns:
      `step(state, batch) -> (state, metrics)`; `state` is donated (do not reuse it), `batch`
      must already be placed with `batch_shardings(mesh, rules)`.
    """
    fn = functools.partial(step_lib.train_step, loss=loss, tx=tx, schedule=schedule,
                           grad_accum=grad_accum)
    jitted = jax.jit(fn, in_shardings=(state_shardings, batch_shardings(mesh, rules)),
                     out_shardings=(state_shardings, sharding.replicated(mesh)),
                     donate_argnames="state")

    def run(state: TrainState, batch: Mapping[str, jax.Array]):
        with sharding.use_mesh(mesh, rules):
            return jitted(state, batch)

    run.jitted = jitted  # exposed for tests (trace counting) and cost analysis
    return run


def jit_eval_step(*, loss: step_lib.LossFn, mesh: Mesh, rules: str | sharding.Rules,
                  state_shardings: TrainState) -> Callable:
    """Compiles `eval_step`: the step's loss without gradients, same shardings in, metrics
    replicated out, nothing donated (the state goes on training).

    Args:
      loss: the loss to evaluate (`Objective.bind`).
      mesh: the device mesh.
      rules: the sharding preset or rule table.
      state_shardings: from `state.train_state_shardings`.
    Returns:
      `eval_step(state, batch) -> metrics`; `batch` placed as `batch_shardings(mesh, rules)`.
    """
    fn = functools.partial(step_lib.eval_step, loss=loss)
    jitted = jax.jit(fn, in_shardings=(state_shardings, batch_shardings(mesh, rules)),
                     out_shardings=sharding.replicated(mesh))

    def run(state: TrainState, batch: Mapping[str, jax.Array]):
        with sharding.use_mesh(mesh, rules):
            return jitted(state, batch)

    run.jitted = jitted
    return run


def init_train_state(params: Any, *, tx: optax.GradientTransformation, seed: int,
                     state_shardings: TrainState, ref_params: Any = None) -> TrainState:
    """A fresh TrainState laid out by `state_shardings`; `params` (and ref_params) are donated.

    Args:
      params: the initial parameters, already placed with the params' shardings.
      tx: the optimizer.
      seed: the run's seed.
      state_shardings: from `state.train_state_shardings`.
      ref_params: a separate copy of the reference parameters, or None.
    Returns:
      the TrainState at step 0.
    """
    def build(p, r, s):
        return init_state(p, tx=tx, seed=s, ref_params=r)

    jitted = jax.jit(build, out_shardings=state_shardings, donate_argnames=("p", "r"))
    return jitted(params, ref_params, jnp.int32(seed))
