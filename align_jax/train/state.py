"""TrainState: everything a train step reads and writes, and its abstract form and shardings.

The state is built abstractly first: `abstract_state` runs the optimizer's init under
`jax.eval_shape` over the *boxed* abstract parameters (`nn.LogicallyPartitioned` leaves), so the
optimizer moments carry the same logical axes as the parameters they track; `train_state_shardings`
then turns the boxes into NamedShardings. Nothing full-size is allocated on one device.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from align_jax import sharding


@flax.struct.dataclass
class TrainState:
    """The state of a run.

    step:        int32 scalar, the number of updates applied so far.
    params:      the trained (float32 master) parameters.
    opt_state:   the optax state.
    rng:         uint32 raw key data; the step draws `fold_in(key, step)`, so a resumed run
                 draws the same numbers as an uninterrupted one.
    ref_params:  frozen reference parameters (DPO-style objectives), or None. They are not
                 checkpointed: they are rebuilt from the run's initial parameters.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ref_params: Any = None

    def key(self) -> jax.Array:
        """The run's typed PRNG key."""
        return jax.random.wrap_key_data(self.rng)


def init_state(params: Any, *, tx: optax.GradientTransformation, seed: int | jax.Array,
               ref_params: Any = None) -> TrainState:
    """A fresh state at step 0 (pure; jit it with out_shardings, see compile.init_train_state).

    Args:
      params: initial parameters (plain or boxed).
      tx: the optimizer.
      seed: an int or an int32 scalar array.
      ref_params: frozen reference parameters, or None.
    Returns:
      the TrainState.
    """
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng, ref_params=ref_params)


def abstract_state(abstract_params: Any, *, tx: optax.GradientTransformation,
                   with_ref: bool = False, abstract_ref: Any = None) -> TrainState:
    """The boxed abstract TrainState (ShapeDtypeStructs; allocates nothing).

    Args:
      abstract_params: boxed abstract parameters, e.g. `transformer.abstract_params(config)`.
      tx: the optimizer.
      with_ref: whether the state holds frozen reference parameters (shaped like the params).
      abstract_ref: boxed abstract frozen params of another shape (LoRA: the trained params
        are the adapters, the frozen base rides here); implies with_ref.
    Returns:
      a TrainState whose array leaves are ShapeDtypeStructs, boxed where the parameter was.
    """
    def build(p, r):
        if r is None and with_ref:
            r = p
        return init_state(p, tx=tx, seed=0, ref_params=r)
    return jax.eval_shape(build, abstract_params, abstract_ref)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _clean_boxes(tree: Any) -> Any:
    """Unboxes leaves whose rank no longer matches their logical names.

    Optimizers that factor their statistics (Adafactor's row/column moments, its [1] placeholders)
    keep the parameter's box around a lower-rank array; those are small, so they are replicated.
    """
    def one(x):
        if _is_box(x) and (not hasattr(x.value, "shape") or len(x.value.shape) != len(x.names)):
            return x.value
        return x
    return jax.tree.map(one, tree, is_leaf=_is_box)


def train_state_shardings(abstract: TrainState, mesh: Mesh,
                          rules: str | sharding.Rules) -> TrainState:
    """NamedShardings with the unboxed structure of `abstract` (for jit in/out shardings).

    Args:
      abstract: the boxed abstract state from `abstract_state`.
      mesh: the device mesh.
      rules: a sharding preset name or rule table.
    Returns:
      a TrainState of NamedShardings.
    """
    return sharding.tree_shardings(_clean_boxes(abstract), mesh, rules)


def abstract_arrays(abstract: TrainState, shardings: TrainState) -> TrainState:
    """Unboxed ShapeDtypeStructs that carry their shardings (a restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(_clean_boxes(abstract)), shardings)
