"""Bootstrap intervals against an independent numpy implementation of the same scheme."""

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from align_jax.eval.bootstrap import Bootstrap, mean_interval, paired_difference
from align_jax.eval.metrics import bleu, bleu_from_statistics, bleu_statistics

# The documented scheme, written out: R x n indices from default_rng(seed), the statistic of
# each resample, the 2.5% and 97.5% quantiles (numpy's default linear interpolation).
R, SEED = 2000, 0


def _numpy_indices(n, resamples=R, seed=SEED):
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _numpy_interval(stat_R):
    return tuple(np.percentile(stat_R, [2.5, 97.5]))


# Sums over a resample are matrix products in the library and gathers + sums here: the same
# numbers up to float64 summation order (relative 1e-12 is far above that rounding).
TOL = dict(rel=1e-12, abs=1e-12)

VALUES = np.array([0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0,
                   1.0, 0.0, 1.0, 0.0, 1.0])
OTHER = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 1.0,
                  1.0, 1.0, 1.0, 0.0, 0.0])


def test_mean_interval_equals_numpy():
    got = mean_interval(VALUES)
    stat = VALUES[_numpy_indices(len(VALUES))].mean(axis=1)
    lo, hi = _numpy_interval(stat)
    assert got.estimate == pytest.approx(VALUES.mean(), **TOL)
    assert (got.low, got.high) == (pytest.approx(lo, **TOL), pytest.approx(hi, **TOL))
    assert got.n == len(VALUES)
    assert got.low <= got.estimate <= got.high  # holds for this (non-degenerate) sample


def test_paired_difference_resamples_both_with_the_same_indices():
    got = paired_difference(VALUES, OTHER)
    idx = _numpy_indices(len(VALUES))
    stat = VALUES[idx].mean(axis=1) - OTHER[idx].mean(axis=1)
    lo, hi = _numpy_interval(stat)
    assert got.estimate == pytest.approx(VALUES.mean() - OTHER.mean(), **TOL)
    assert (got.low, got.high) == (pytest.approx(lo, **TOL), pytest.approx(hi, **TOL))
    # Pairing matters: resampling the two independently gives a different (wider) interval
    # on these positively correlated vectors.
    idx2 = np.random.default_rng(SEED + 1).integers(0, len(OTHER), size=(R, len(OTHER)))
    unpaired = VALUES[idx].mean(axis=1) - OTHER[idx2].mean(axis=1)
    assert np.subtract(*_numpy_interval(unpaired)[::-1]) > got.high - got.low
    # Identical vectors: every resampled difference is exactly 0.
    same = paired_difference(VALUES, VALUES.copy())
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    assert not same.excludes_zero()


def test_interval_narrows_as_items_grow():
    rng = np.random.default_rng(123)
    widths = []
    for n in (20, 80, 320):
        x = (rng.random(n) < 0.6).astype(float)
        i = mean_interval(x)
        assert i.low <= i.estimate <= i.high
        widths.append(i.high - i.low)
    # The width of a mean's interval goes as 1/sqrt(n): each 4x more items roughly halves
    # it; "narrower by at least a quarter" leaves room for the sampling noise.
    assert widths[1] < 0.75 * widths[0] and widths[2] < 0.75 * widths[1]


def test_ratio_and_other_seeds_and_confidence():
    nll = np.array([12.0, 3.5, 7.25, 20.0, 1.0, 9.5])
    tokens = np.array([10.0, 4.0, 5.0, 12.0, 2.0, 8.0])
    boot = Bootstrap(len(nll), resamples=500, seed=7)
    reps = boot.ratio(nll, tokens)
    idx = _numpy_indices(len(nll), 500, 7)
    stat = nll[idx].sum(1) / tokens[idx].sum(1)
    assert reps.estimate == pytest.approx(nll.sum() / tokens.sum(), **TOL)
    np.testing.assert_allclose(reps.values_R, stat, rtol=1e-12)
    i90 = reps.interval(confidence=0.9)
    lo, hi = np.percentile(stat, [5, 95])
    assert (i90.low, i90.high) == (pytest.approx(lo, **TOL), pytest.approx(hi, **TOL))
    i95 = reps.interval()
    assert i95.low <= i90.low and i90.high <= i95.high
    with pytest.raises(ValueError, match="expected 6 per-item values"):
        boot.mean(np.ones(5))
    with pytest.raises(ValueError, match="different items"):
        _ = boot.mean(nll) - Bootstrap(5, resamples=500, seed=7).mean(nll[:5])


HYPS = ["the board chair speaks to journalists", "no, never accept cash", "report it today",
        "yes", "", "members get a written quote before any repair starts",
        "two people on every roof", "ask the data coordinator first"]
REFS = ["only the board chair speaks to journalists", "never accept cash from a supplier",
        "report every near miss the same day", "yes, you may stop unsafe work",
        "ask your coordinator", "members get a written quote before any repair",
        ["never work on a roof alone", "two people on a roof, always"],
        "outside requests go to the data coordinator"]


def test_bleu_from_sentence_statistics_equals_corpus_bleu():
    stats = bleu_statistics(HYPS, REFS)
    assert stats.shape == (len(HYPS), 10)
    assert bleu_from_statistics(stats.sum(0)) == pytest.approx(bleu(HYPS, REFS), abs=1e-9)
    # The bootstrap's BLEU on each resample is sacrebleu's corpus BLEU of that resampled
    # corpus (checked on a few resamples: each is a full sacrebleu call).
    boot = Bootstrap(len(HYPS), resamples=200, seed=3)
    reps = boot.statistic(stats, bleu_from_statistics)
    idx = _numpy_indices(len(HYPS), 200, 3)
    for r in (0, 1, 57, 199):
        hyps = [HYPS[i] for i in idx[r]]
        refs = [REFS[i] for i in idx[r]]
        assert reps.values_R[r] == pytest.approx(bleu(hyps, refs), abs=1e-9)
    assert reps.estimate == pytest.approx(BLEU().corpus_score(
        HYPS, [[r if isinstance(r, str) else r[0] for r in REFS],
               [None if isinstance(r, str) else r[1] for r in REFS]]).score, abs=1e-9)
