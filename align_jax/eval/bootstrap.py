"""Bootstrap intervals over held-out items: one statistic, or the paired difference of two.

The scheme, fixed so that every number in a report can be reproduced (and is, by the tests,
with plain numpy):

- R resamples (default 2,000) of n items are drawn with replacement as
  `np.random.default_rng(seed).integers(0, n, size=(R, n))` (default seed 0). Only n and the
  seed decide the draws, so every statistic over the same n items (every system's answers to
  the same questions) sees the same resamples: a difference of two systems is *paired*
  (item indices resampled once, applied to both).
- A statistic is recomputed on each resample from per-item parts: a mean of per-item scores,
  a ratio of summed parts (NLL per token = summed NLL / summed tokens), or any function of
  summed sufficient statistics (corpus BLEU from per-sentence n-gram counts). Sums over a
  resample are `counts_RN @ parts_N...`, where counts_RN[r, i] is how often item i was drawn.
- The interval is the percentile interval: the (1 - c)/2 and (1 + c)/2 quantiles of the R
  values (numpy's default linear interpolation), c = 0.95 by default.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True, kw_only=True)
class Interval:
    """A point estimate with its bootstrap percentile interval over n items."""

    estimate: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a difference is resolved)."""
        return bool(self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "ci_low": self.low, "ci_high": self.high,
                "n": self.n}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Replicates:
    """A statistic on the items (`estimate`) and on each resample (`values_R`)."""

    estimate: float
    values_R: np.ndarray
    n: int

    def __sub__(self, other: Replicates) -> Replicates:
        if self.n != other.n or self.values_R.shape != other.values_R.shape:
            raise ValueError(f"paired difference of statistics over different items "
                             f"({self.n} vs {other.n})")
        return Replicates(estimate=self.estimate - other.estimate,
                          values_R=self.values_R - other.values_R, n=self.n)

    def interval(self, *, confidence: float = CONFIDENCE) -> Interval:
        """The percentile interval of the resampled values around the estimate."""
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        finite = self.values_R[np.isfinite(self.values_R)]
        if self.n == 0 or not len(finite):
            return Interval(estimate=float(self.estimate), low=float("nan"),
                            high=float("nan"), n=self.n)
        tail = (1 - confidence) / 2
        low, high = np.quantile(finite, [tail, 1 - tail])
        return Interval(estimate=float(self.estimate), low=float(low), high=float(high),
                        n=self.n)


# A report draws for a few item counts (questions, pairs, yes/no questions); each [R, n]
# matrix is R * n * 8 bytes (16 MB for 1,000 items), so only the latest few are kept.
@functools.lru_cache(maxsize=4)
def _counts(n: int, resamples: int, seed: int) -> np.ndarray:
    idx_RN = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts_RN = np.zeros((resamples, n), np.float64)
    np.add.at(counts_RN, (np.arange(resamples)[:, None], idx_RN), 1.0)
    counts_RN.setflags(write=False)
    return counts_RN


class Bootstrap:
    """The resamples of n items; every statistic over these items uses the same ones.

    Args:
      n: number of items (questions, pairs).
      resamples: R.
      seed: numpy seed of the draws.
    """

    def __init__(self, n: int, *, resamples: int = RESAMPLES, seed: int = SEED):
        if n < 0 or resamples < 1:
            raise ValueError(f"Bootstrap needs n >= 0 and resamples >= 1, got {n}, {resamples}")
        self.n, self.resamples, self.seed = int(n), int(resamples), int(seed)
        self.counts_RN = (_counts(self.n, self.resamples, self.seed) if self.n
                          else np.zeros((self.resamples, 0)))

    def _parts(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.shape[:1] != (self.n,):
            raise ValueError(f"expected {self.n} per-item values, got shape {x.shape}")
        return x

    def sums(self, parts) -> np.ndarray:
        """Per resample, the sum of the items' parts: [R] for parts [n], [R, K] for [n, K]."""
        return self.counts_RN @ self._parts(parts)

    def mean(self, values) -> Replicates:
        """The mean of per-item values (accuracy: per-item 0, 1/2 or 1)."""
        v = self._parts(values)
        est = float(v.mean()) if self.n else float("nan")
        return Replicates(estimate=est, values_R=self.sums(v) / max(self.n, 1), n=self.n)

    def ratio(self, numerators, denominators) -> Replicates:
        """sum(numerators) / sum(denominators) (NLL per token: summed NLL / summed tokens)."""
        num, den = self._parts(numerators), self._parts(denominators)
        with np.errstate(divide="ignore", invalid="ignore"):
            est = float(num.sum() / den.sum()) if self.n else float("nan")
            values = self.sums(num) / self.sums(den)
        return Replicates(estimate=est, values_R=values, n=self.n)

    def statistic(self, parts, fn: Callable[[np.ndarray], float]) -> Replicates:
        """fn of the summed per-item parts [n, K] (corpus BLEU from n-gram statistics)."""
        p = self._parts(parts)
        est = float(fn(p.sum(0))) if self.n else float("nan")
        values = np.array([fn(s) for s in self.sums(p)], np.float64)
        return Replicates(estimate=est, values_R=values, n=self.n)


def mean_interval(values, *, resamples: int = RESAMPLES, seed: int = SEED,
                  confidence: float = CONFIDENCE) -> Interval:
    """The mean of per-item values with its percentile bootstrap interval.

    Args:
      values: one number per item.
      resamples, seed, confidence: see the module docstring.
    Returns:
      Interval(estimate=mean, low, high, n).
    """
    b = Bootstrap(len(values), resamples=resamples, seed=seed)
    return b.mean(values).interval(confidence=confidence)


def paired_difference(a, b, *, resamples: int = RESAMPLES, seed: int = SEED,
                      confidence: float = CONFIDENCE) -> Interval:
    """mean(a) - mean(b) over the same items, both resampled with the same indices.

    Args:
      a, b: one number per item each, item i of a and of b being the same question.
      resamples, seed, confidence: see the module docstring.
    Returns:
      Interval of the difference.
    """
    if len(a) != len(b):
        raise ValueError(f"paired difference of {len(a)} and {len(b)} items")
    boot = Bootstrap(len(a), resamples=resamples, seed=seed)
    return (boot.mean(a) - boot.mean(b)).interval(confidence=confidence)


__all__ = ["CONFIDENCE", "RESAMPLES", "SEED", "Bootstrap", "Interval", "Replicates",
           "mean_interval", "paired_difference"]
