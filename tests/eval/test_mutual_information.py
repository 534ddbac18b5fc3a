import math

import numpy as np
import pytest

from align_jax.eval import mi_lower_bound, mi_lower_bound_matrix


def _np_bound(logps, target):
    m = logps.max()
    lse = m + np.log(np.exp(logps - m).sum())
    return logps[target] - (lse - np.log(len(logps)))


def test_matches_numpy_and_limits():
    rng = np.random.default_rng(0)
    for c in (2, 3, 8):
        logps = rng.normal(size=c) * 5 - 40
        for t in range(c):
            np.testing.assert_allclose(mi_lower_bound(logps, t), _np_bound(logps, t), rtol=1e-5)
    # Independent of the constitution: 0. Only the target explains the response: log C.
    np.testing.assert_allclose(mi_lower_bound(np.full(4, -12.0), 2), 0.0, atol=1e-6)
    np.testing.assert_allclose(mi_lower_bound(np.array([0.0, -1e4, -1e4, -1e4]), 0),
                               math.log(4), atol=1e-5)


def test_matrix_mean_uses_columns():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(3, 2, 2))
    want = np.mean([_np_bound(m[b, :, j], j) for b in range(3) for j in range(2)])
    np.testing.assert_allclose(mi_lower_bound_matrix(m), want, rtol=1e-5)


def test_reference_estimate_matches_numpy_and_is_not_a_bound():
    from align_jax.eval.mutual_information import mi_reference_estimate
    rng = np.random.default_rng(2)
    m = rng.normal(size=(5, 4, 4)) * 20 - 150  # summed log-probs of 4 responses, 4 constitutions
    # The reference code: per constitution k, target log p(y_k|x,c_k) minus the mean over all
    # constitutions i of log p(y_k|x,c_i); averaged over k.
    want = np.array([np.mean([m[b, k, k] - np.mean(m[b, :, k]) for k in range(4)])
                     for b in range(5)])
    got = np.asarray(mi_reference_estimate(m))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    bound = np.array([np.mean([_np_bound(m[b, :, j], j) for j in range(4)]) for b in range(5)])
    # Jensen: the mean log is below the log mean, so the estimate is at least the bound ...
    assert np.all(got >= bound - 1e-4)
    # ... and unbounded: a target 20 nats above the others gives 15 nats with C = 4 > log 4.
    sharp = np.full((1, 4, 4), -100.0)
    np.fill_diagonal(sharp[0], -80.0)
    assert float(mi_reference_estimate(sharp)[0]) == pytest.approx(15.0)
    assert float(mi_lower_bound_matrix(sharp)) < math.log(4)
