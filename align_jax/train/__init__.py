"""The train engine: one jitted, sharded step for every objective, and the loop around it."""

from align_jax.train.checkpoint import Checkpointer, load_params
from align_jax.train.compile import batch_shardings, init_train_state, jit_train_step
from align_jax.train.loop import NonFiniteLossError, export_hf, train, write_run_info
from align_jax.train.metrics import MetricsLogger, mfu, peak_flops
from align_jax.train.optim import OptimizerConfig, make_optimizer, make_schedule, weight_decay_mask
from align_jax.train.state import (
                                   TrainState,
                                   abstract_arrays,
                                   abstract_state,
                                   init_state,
                                   train_state_shardings,
)
from align_jax.train.step import accumulate_gradients, train_step

__all__ = [
    "Checkpointer", "MetricsLogger", "NonFiniteLossError", "OptimizerConfig", "TrainState",
    "abstract_arrays", "abstract_state", "accumulate_gradients", "batch_shardings",
    "export_hf", "init_state", "init_train_state", "jit_train_step", "load_params",
    "make_optimizer", "make_schedule", "mfu", "peak_flops", "train", "train_state_shardings",
    "train_step", "weight_decay_mask", "write_run_info",
]
