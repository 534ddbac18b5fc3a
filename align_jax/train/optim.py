"""Optimizers and learning-rate schedules, built from optax pieces.

Every optimizer is the same chain, so options mean the same thing for all of them:

  clip_by_global_norm(clip_norm)        (on the raw, accumulated gradients)
  -> scale_by_{adam | rms | factored_rms}   (rms as torch.optim.RMSprop: decay `rms_decay`,
                                             eps added outside the square root, no bias
                                             correction, state starting at 0)
  -> add_decayed_weights(weight_decay, mask)   (decoupled, AdamW-style: multiplied by the lr)
  -> scale_by_learning_rate(schedule)

`weight_decay` never touches norm scales, biases or parameters that are 1-D per layer.
"""

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import optax

OptimizerName = Literal["adamw", "rmsprop", "adafactor"]
ScheduleName = Literal["cosine", "linear", "constant"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The optimizer, its schedule and its regularisers.

    learning_rate is the peak rate, reached after `warmup_steps` of linear warmup from 0, then
    decayed by `schedule` over the remaining `decay_steps - warmup_steps` steps to
    `end_lr_ratio * learning_rate` (decay_steps None: the run's num_steps). `warmup_ratio`
    gives the warmup as a share of those steps instead, rounded up (ceil(ratio * steps)); as
    in Hugging Face's Trainer, warmup_steps > 0 overrides it (so a run file that includes
    one with a ratio can set steps).

    Attributes:
      name: "adamw", "rmsprop" or "adafactor".
      learning_rate: the peak rate; must be > 0 (a negative rate ascends the loss) unless
        allow_nonpositive_learning_rate is set.
      schedule: "cosine", "linear" or "constant" decay after the warmup.
      warmup_steps: steps of linear warmup from 0 (> 0 overrides warmup_ratio).
      warmup_ratio: warmup as a share of the decay steps, in [0, 1).
      decay_steps: steps of warmup + decay; None: the run's num_steps.
      end_lr_ratio: the rate at the end of the decay, as a share of learning_rate.
      b1, b2, eps: Adam's moment decays and epsilon.
      rms_decay: RMSprop's decay of the squared-gradient average (torch's alpha).
      momentum: RMSprop's momentum; None: none.
      weight_decay: decoupled (AdamW-style) decay; never on norms, biases or 1-D params.
      clip_norm: clip the global gradient norm to this; None: no clipping.
      allow_nonpositive_learning_rate: accept learning_rate <= 0 (deliberate gradient
        ascent or a frozen run).
    """

    name: OptimizerName = "adamw"
    learning_rate: float = 3e-4
    schedule: ScheduleName = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    decay_steps: int | None = None
    end_lr_ratio: float = 0.0
    # Adam's b1/b2; Adafactor keeps its own step-dependent decay (1 - t^-0.8).
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # RMSprop's decay of the squared-gradient average: 0.99 is torch.optim.RMSprop's default
    # (alpha), the optimizer the SAMI paper names for its Mixtral run; `momentum` (None: none).
    rms_decay: float = 0.99
    momentum: float | None = None
    weight_decay: float = 0.0
    # None disables clipping.
    clip_norm: float | None = 1.0
    allow_nonpositive_learning_rate: bool = False

    def __post_init__(self):
        if self.name not in ("adamw", "rmsprop", "adafactor"):
            raise ValueError(
                f"OptimizerConfig.name={self.name!r}: choose adamw, rmsprop or adafactor")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"OptimizerConfig.schedule={self.schedule!r}: choose cosine, linear or constant")
        if self.learning_rate <= 0 and not self.allow_nonpositive_learning_rate:
            raise ValueError(
                f"OptimizerConfig.learning_rate={self.learning_rate}: must be > 0 (a negative "
                "rate trains by gradient ascent); set "
                "optim.OptimizerConfig.allow_nonpositive_learning_rate=True if meant")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} is negative")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"OptimizerConfig.warmup_ratio={self.warmup_ratio} must be in "
                             f"[0, 1)")
        if not 0.0 <= self.rms_decay < 1.0:
            raise ValueError(f"OptimizerConfig.rms_decay={self.rms_decay} must be in [0, 1)")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"OptimizerConfig.clip_norm={self.clip_norm} must be > 0 or None")


def warmup_steps(cfg: OptimizerConfig, *, num_steps: int) -> int:
    """The warmup length: `warmup_steps` when > 0, else ceil(warmup_ratio * steps) where steps
    is `decay_steps` (None: num_steps)."""
    if cfg.warmup_ratio and not cfg.warmup_steps:
        total = cfg.decay_steps if cfg.decay_steps is not None else num_steps
        return math.ceil(cfg.warmup_ratio * total)
    return cfg.warmup_steps


def make_schedule(cfg: OptimizerConfig, *, num_steps: int) -> optax.Schedule:
    """The learning rate as a function of the update count (0 for the first update).

    Args:
      cfg: the optimizer settings.
      num_steps: the run length, used when cfg.decay_steps is None.
    Returns:
      an optax schedule.
    """
    peak = cfg.learning_rate
    total = cfg.decay_steps if cfg.decay_steps is not None else num_steps
    warmup = warmup_steps(cfg, num_steps=num_steps)
    if cfg.schedule != "constant" and total <= warmup:
        raise ValueError(
            f"OptimizerConfig: decay_steps={total} (None means num_steps) must exceed "
            f"the warmup of {warmup} steps (warmup_steps / warmup_ratio) for the "
            f"{cfg.schedule!r} schedule")
    decay_len = max(total - warmup, 1)
    end = cfg.end_lr_ratio * peak
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_len, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_len)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    ramp = optax.linear_schedule(0.0, peak, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _decays(path: tuple[Any, ...], leaf: Any) -> bool:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    shape = (leaf.value if _is_box(leaf) else leaf).shape
    # Stacked layers carry a leading layers axis that says nothing about the kind of parameter.
    per_layer_ndim = len(shape) - (1 if keys and keys[0] == "layers" else 0)
    if per_layer_ndim <= 1:
        return False
    if any("norm" in k for k in keys) or keys[-1].endswith("bias"):
        return False
    return True


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices, not norms, biases or 1-D parameters.

    Works on boxed (abstract) and plain parameter trees alike, so one mask serves the
    abstract `tx.init` and the real update.
    """
    return jax.tree_util.tree_map_with_path(_decays, params, is_leaf=_is_box)


def make_optimizer(cfg: OptimizerConfig, *, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax transformation and its schedule.

    Args:
      cfg: the optimizer settings.
      num_steps: the run length (for the schedule).
    Returns:
      (tx, schedule); schedule(step) is the learning rate of update `step`, for the metrics.
    """
    schedule = make_schedule(cfg, num_steps=num_steps)
    parts: list[optax.GradientTransformation] = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "adamw":
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    elif cfg.name == "rmsprop":
        # torch.optim.RMSprop: grad / (sqrt(avg) + eps), avg starting at 0, no bias correction.
        parts.append(optax.scale_by_rms(decay=cfg.rms_decay, eps=cfg.eps, eps_in_sqrt=False))
        if cfg.momentum:
            parts.append(optax.trace(decay=cfg.momentum))
    else:
        # Adafactor's factored second moments plus its update clipping; the step size stays
        # absolute (no parameter-scale multiplier), so learning_rate means the same as for AdamW.
        parts.append(optax.scale_by_factored_rms())
        parts.append(optax.clip_by_block_rms(1.0))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule

