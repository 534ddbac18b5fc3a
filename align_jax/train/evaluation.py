"""Evaluation during training: an eval set scored every `every` steps, the best step tracked.

`EvalConfig` is what a run binds (`train_main.evaluation`); `Evaluator` is what the host loop
(`train.loop.train`) drives: the eval batches (materialised once), the settings, and the
best-so-far record (`BestTracker`), which is checkpointed with every save so that a resumed
run keeps tracking exactly as an uninterrupted one would.

An evaluation is the step's own loss without gradients (`step.eval_step`, jitted under the
same mesh and shardings as the step) over every eval batch; the metrics of the batches are
combined as the step combines microbatches: weighted by the objective's count of scored units
(`num_tokens`, `num_pairs`, `num_examples`), counts summed. For DPO the reference of the eval
data is the training reference (precomputed over the eval data too, or the frozen params).
"""

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from align_jax.train.step import WEIGHT_METRICS

PREFIX = "eval/"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """An evaluation set scored during training, and what to do with its scores.

    Attributes:
      data: eval records in the objective's schema, the same forms as train_main.data (a
        .jsonl path or dir, "hf:...", "tfds:..."); None: no evaluation.
      every: evaluate every this many steps (and after the last step); 0: only at the end.
      on_start: also evaluate before the first update (step 0, a baseline: logged, never
        the best step).
      batch_size: rows per eval batch; None: train_main.batch_size.
      metric: the eval metric that picks the best step and drives early stopping, by its
        name without the "eval/" prefix ("loss", or for DPO "accuracy", "margin", ...).
      greater_is_better: whether a larger metric is better; None: False for a metric whose
        name holds "loss" or "nll", True otherwise.
      keep_best: keep the checkpoint of the best evaluation (besides the latest `keep`) and
        export it as hf/ (and peft/) instead of the last step's.
      early_stopping_patience: stop once this many evaluations in a row did not improve on
        the best; 0: never stop early.
    """

    data: str | None = None
    every: int = 0
    on_start: bool = True
    batch_size: int | None = None
    metric: str = "loss"
    greater_is_better: bool | None = None
    keep_best: bool = False
    early_stopping_patience: int = 0

    def __post_init__(self):
        for name in ("every", "early_stopping_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"EvalConfig.{name}={value!r}: expected an integer >= 0")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not
                                            isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"EvalConfig.batch_size={self.batch_size!r}: expected an "
                             "integer >= 1 or None")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"EvalConfig.metric={self.metric!r}: expected a metric name")
        if self.data is None and (self.keep_best or self.early_stopping_patience):
            raise ValueError("EvalConfig.keep_best / early_stopping_patience need "
                             "EvalConfig.data (an eval set to score)")

    @property
    def enabled(self) -> bool:
        return self.data is not None

    @property
    def maximize(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        name = self.metric.lower()
        return not ("loss" in name or "nll" in name)


@dataclasses.dataclass(kw_only=True)
class BestTracker:
    """The best evaluation so far and how many evaluations since did not improve on it.

    A tie does not improve: the best step is the earliest step reaching the best value.
    """

    maximize: bool
    best_step: int | None = None
    best_value: float | None = None
    since_best: int = 0

    def update(self, step: int, value: float) -> bool:
        """Accounts one evaluation; returns whether it is the new best."""
        if not math.isfinite(value):
            improved = False
        elif self.best_value is None:
            improved = True
        else:
            improved = value > self.best_value if self.maximize else value < self.best_value
        if improved:
            self.best_step, self.best_value, self.since_best = step, float(value), 0
        else:
            self.since_best += 1
        return improved

    def get_state(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_value": self.best_value,
                "since_best": self.since_best}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.best_step = state.get("best_step")
        value = state.get("best_value")
        self.best_value = None if value is None else float(value)
        self.since_best = int(state.get("since_best", 0))


class Evaluator:
    """The eval set and settings of one run, and its best-so-far record (mutated by `train`).

    Args:
      config: the settings.
      batches: the eval batches (host numpy dicts, each the global batch), in order.
    """

    def __init__(self, config: EvalConfig, batches: Sequence[Mapping[str, np.ndarray]]):
        if not batches:
            raise ValueError(f"EvalConfig.data={config.data!r}: no eval batches (fewer "
                             "examples than one eval batch?)")
        self.config = config
        self.batches = list(batches)
        self.tracker = BestTracker(maximize=config.maximize)
        self.stop_reason: str | None = None

    def due(self, step: int, num_steps: int) -> bool:
        """Whether `step` (updates done) is an evaluation step."""
        every = self.config.every
        return step == num_steps or (every > 0 and step % every == 0)

    def record(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Accounts the evaluation at `step` (> 0); returns whether it is the new best. Sets
        `stop_reason` when early stopping's patience has run out."""
        name = self.config.metric
        if name not in metrics:
            raise ValueError(f"EvalConfig.metric={name!r}: the evaluation reports no such "
                             f"metric; it reports {sorted(metrics)}")
        improved = self.tracker.update(step, metrics[name])
        self._check_patience()
        return improved

    def _check_patience(self) -> None:
        patience, t = self.config.early_stopping_patience, self.tracker
        if patience and t.best_step is not None and t.since_best >= patience:
            self.stop_reason = (
                f"early stopping: eval {self.config.metric} did not improve for {patience} "
                f"evaluations (best {t.best_value:.6g} at step {t.best_step})")

    def get_state(self) -> dict[str, Any]:
        return self.tracker.get_state()

    def set_state(self, state: Mapping[str, Any] | None) -> None:
        if state:
            self.tracker.set_state(state)
            self._check_patience()


def combine(per_batch: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """One set of metrics from per-batch ones: counts (`WEIGHT_METRICS`) summed, the rest
    averaged weighted by the first count present (as `step.accumulate_gradients` weighs
    microbatches), or equally without one; a perplexity is exp of its logs' weighted mean."""
    per_batch = list(per_batch)
    weights = np.asarray([_weight(m) for m in per_batch], np.float64)
    total = max(float(weights.sum()), 1e-12)
    out = {}
    for key in per_batch[0]:
        values = np.asarray([m[key] for m in per_batch], np.float64)
        if key in WEIGHT_METRICS:
            out[key] = float(values.sum())
        elif key in _EXP_OF_MEAN:
            # exp(mean NLL) per batch: the set's is exp of the weighted mean of the logs.
            out[key] = float(np.exp((np.log(values) * weights).sum() / total))
        else:
            out[key] = float((values * weights).sum() / total)
    return out


# Metrics that are exp(a mean over the scored units) (sft/lm's perplexity).
_EXP_OF_MEAN = ("perplexity",)


def _weight(metrics: Mapping[str, float]) -> float:
    for name in WEIGHT_METRICS:
        if name in metrics:
            return float(metrics[name])
    return 1.0


def evaluate(eval_fn: Callable, state: Any, batches: Sequence[Mapping[str, np.ndarray]], *,
             put: Callable[[Mapping[str, np.ndarray]], Any]) -> dict[str, float]:
    """The eval metrics of `state` over `batches`.

    Args:
      eval_fn: `eval_fn(state, batch) -> metrics` (`compile.jit_eval_step`).
      state: the TrainState to score (read, not donated).
      batches: host batches.
      put: places a host batch on the devices (the train loop's batch placement).
    Returns:
      host float metrics (unprefixed).
    """
    # Every batch is dispatched before any result is read: one host sync per evaluation.
    outs = [eval_fn(state, put(b)) for b in batches]
    host = jax.device_get(outs)
    return combine({k: float(v) for k, v in m.items()} for m in host)
