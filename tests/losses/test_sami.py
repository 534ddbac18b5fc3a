"""SAMI two-sided InfoNCE: closed forms, invariances, numpy reference, objective."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import losses
from align_jax.models import transformer
from align_jax.models.config import get_config


def _np_sami(x):
    """Figure 5 of the paper, per query, in float64: (row term, column term) each [B]."""
    x = np.asarray(x, np.float64)
    b, c, _ = x.shape
    rows, cols = np.zeros(b), np.zeros(b)
    for q in range(b):
        m = x[q]
        row_lsm = m - np.log(np.exp(m).sum(1, keepdims=True))  # over responses j
        col_lsm = m - np.log(np.exp(m).sum(0, keepdims=True))  # over constitutions i
        rows[q] = -np.mean([row_lsm[i, i] for i in range(c)])
        cols[q] = -np.mean([col_lsm[j, j] for j in range(c)])
    return rows, cols


@pytest.mark.parametrize("c", [2, 4])
def test_constant_matrix_gives_log_c(c):
    loss, metrics = losses.sami_loss(jnp.full((3, c, c), -12.5))
    np.testing.assert_allclose(loss, math.log(c), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_responses"], math.log(c), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_constitutions"], math.log(c), rtol=1e-6)
    np.testing.assert_allclose(metrics["mi_bound"], 0.0, atol=1e-6)


@pytest.mark.parametrize("c", [2, 3, 5])
def test_random_matrices_match_numpy(c):
    rng = np.random.default_rng(c)
    x = rng.normal(size=(4, c, c)) * 3 - 20
    loss, metrics = losses.sami_loss(jnp.asarray(x, jnp.float32))
    rows, cols = _np_sami(x)
    np.testing.assert_allclose(loss, (0.5 * (rows + cols)).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_responses"], rows.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_constitutions"], cols.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["diagonal_mean"],
                               np.mean([np.trace(m) / c for m in x]), rtol=1e-5)
    acc_r = np.mean([np.mean(np.argmax(m, 1) == np.arange(c)) for m in x])
    acc_c = np.mean([np.mean(np.argmax(m, 0) == np.arange(c)) for m in x])
    np.testing.assert_allclose(metrics["accuracy_responses"], acc_r)
    np.testing.assert_allclose(metrics["accuracy_constitutions"], acc_c)
    np.testing.assert_allclose(metrics["accuracy"], 0.5 * (acc_r + acc_c))


def test_shift_invariances():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 4, 4)) * 2, jnp.float32)
    base, m0 = losses.sami_loss(x)
    # A constant added to the whole matrix changes nothing.
    shifted, _ = losses.sami_loss(x + 37.0)
    np.testing.assert_allclose(shifted, base, rtol=1e-5)
    # A constant added to one row (one constitution) leaves the row-normalised term unchanged
    # and changes the column-normalised one.
    row_shift = x.at[:, 1, :].add(3.0)
    _, m1 = losses.sami_loss(row_shift)
    np.testing.assert_allclose(m1["loss_responses"], m0["loss_responses"], rtol=1e-5)
    assert abs(float(m1["loss_constitutions"]) - float(m0["loss_constitutions"])) > 1e-2
    # And symmetrically for one column (one response).
    _, m2 = losses.sami_loss(x.at[:, :, 2].add(3.0))
    np.testing.assert_allclose(m2["loss_constitutions"], m0["loss_constitutions"], rtol=1e-5)
    assert abs(float(m2["loss_responses"]) - float(m0["loss_responses"])) > 1e-2


def test_gradient_pushes_diagonal_up():
    x = jnp.zeros((1, 3, 3))
    g = np.asarray(jax.grad(lambda m: losses.sami_loss(m)[0])(x))[0]
    # At a constant matrix: d/dx_ii = -(1 - 1/C)/C, d/dx_ij = (1/C)/C for i != j.
    c = 3
    want = np.full((c, c), 1 / c**2)
    np.fill_diagonal(want, -(1 - 1 / c) / c)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_mask_drops_padded_queries():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 2, 2)).astype(np.float32)
    loss, _ = losses.sami_loss(jnp.asarray(x), mask_B=jnp.asarray([1.0, 0.0, 1.0]))
    rows, cols = _np_sami(x)
    np.testing.assert_allclose(loss, (0.5 * (rows + cols))[[0, 2]].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, C, C\]"):
        losses.sami_loss(jnp.zeros((2, 3, 4)))


def _seq(prefix, response):
    seq = prefix + response
    mask = [1.0 if i + 1 >= len(prefix) else 0.0 for i in range(len(seq) - 1)]
    return seq[:-1], seq[1:], mask


def test_sami_objective_matches_numpy():
    config = get_config("tiny", init_std=0.2)
    params = transformer.init_params(config, jax.random.key(0))
    constitutions = [[50, 51], [60, 61, 62]]
    queries = [[5, 6], [7]]
    responses = [[[80, 81, 2], [90, 2]], [[100, 101, 102, 2], [110, 111]]]  # [query][j]
    b, c, t = 2, 2, 8
    batch = {k: np.zeros((b, c, c, t), np.int32) for k in ("tokens", "targets", "positions",
                                                           "segment_ids")}
    batch["loss_mask"] = np.zeros((b, c, c, t), np.float32)
    for q in range(b):
        for i in range(c):
            for j in range(c):
                tok, tgt, mask = _seq(constitutions[i] + queries[q], responses[q][j])
                n = len(tok)
                batch["tokens"][q, i, j, :n], batch["targets"][q, i, j, :n] = tok, tgt
                batch["loss_mask"][q, i, j, :n] = mask
                batch["segment_ids"][q, i, j, :n] = 1
                batch["positions"][q, i, j, :n] = np.arange(n)
    fn = jax.jit(jax.value_and_grad(functools.partial(losses.sami_objective, config=config),
                                    has_aux=True))
    (loss, metrics), grads = fn(params, batch)

    logits = transformer.forward(config, params, batch["tokens"].reshape(-1, t),
                                 segment_ids_BT=batch["segment_ids"].reshape(-1, t))
    x = np.asarray(logits, np.float64)
    lsm = x - x.max(-1, keepdims=True)
    lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
    lp = np.take_along_axis(lsm, batch["targets"].reshape(-1, t)[..., None], -1)[..., 0]
    mask = batch["loss_mask"].reshape(-1, t)
    mat = ((lp * mask).sum(-1) / mask.sum(-1)).reshape(b, c, c)
    rows, cols = _np_sami(mat)
    np.testing.assert_allclose(loss, (0.5 * (rows + cols)).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["diagonal_mean"],
                               np.mean([np.trace(m) / c for m in mat]), rtol=1e-5)
    assert float(jnp.abs(grads["embedding"]).sum()) > 0

    # The optional KL regulariser to the frozen initial model: + kl_coef * mean over queries
    # and matched pairs of the per-token log-ratio (numpy, from the reference model's logits).
    ref = transformer.init_params(config, jax.random.key(1))
    kl_loss, kl_metrics = jax.jit(functools.partial(losses.sami_objective, config=config,
                                                    kl_coef=0.5))(params, batch, ref_params=ref)
    xr = np.asarray(transformer.forward(config, ref, batch["tokens"].reshape(-1, t),
                                        segment_ids_BT=batch["segment_ids"].reshape(-1, t)),
                    np.float64)
    lsr = xr - xr.max(-1, keepdims=True)
    lsr = lsr - np.log(np.exp(lsr).sum(-1, keepdims=True))
    lpr = np.take_along_axis(lsr, batch["targets"].reshape(-1, t)[..., None], -1)[..., 0]
    mat_ref = ((lpr * mask).sum(-1) / mask.sum(-1)).reshape(b, c, c)
    kl = np.mean([np.mean(np.diag(m) - np.diag(r)) for m, r in zip(mat, mat_ref)])
    np.testing.assert_allclose(kl_metrics["kl"], kl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kl_loss, (0.5 * (rows + cols)).mean() + 0.5 * kl, rtol=1e-5)
    from align_jax.losses.objectives import get_objective
    sami_obj = get_objective("sami")
    assert sami_obj.reference_mode("precomputed", {}) == "none"
    assert sami_obj.reference_mode("precomputed", {"kl_coef": 0.1}) == "params"
    with pytest.raises(ValueError, match="kl_coef > 0 needs"):
        losses.sami_objective(params, batch, config=config, kl_coef=0.5)
