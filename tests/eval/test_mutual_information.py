import math

import numpy as np

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
