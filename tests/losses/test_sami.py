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

    # The optional KL regulariser to the frozen initial model: + kl_coef * the per-position
    # KL over the vocabulary on response tokens (all C x C rows), mean per query then over
    # queries; numpy from both models' full logits.
    ref = transformer.init_params(config, jax.random.key(1))
    kl_loss, kl_metrics = jax.jit(functools.partial(losses.sami_objective, config=config,
                                                    kl_coef=0.5))(params, batch, ref_params=ref)
    xr = np.asarray(transformer.forward(config, ref, batch["tokens"].reshape(-1, t),
                                        segment_ids_BT=batch["segment_ids"].reshape(-1, t)),
                    np.float64)
    lsr = xr - xr.max(-1, keepdims=True)
    lsr = lsr - np.log(np.exp(lsr).sum(-1, keepdims=True))
    kl_tok = (np.exp(lsm) * (lsm - lsr)).sum(-1).reshape(b, c, c, t)
    m4 = mask.reshape(b, c, c, t)
    kl = np.mean([(kl_tok[q] * m4[q]).sum() / m4[q].sum() for q in range(b)])
    assert kl > 0
    np.testing.assert_allclose(kl_metrics["kl"], kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(kl_loss, (0.5 * (rows + cols)).mean() + 0.5 * kl, rtol=1e-5)
    from align_jax.losses.objectives import get_objective
    sami_obj = get_objective("sami")
    assert sami_obj.reference_mode("precomputed", {}) == "none"
    assert sami_obj.reference_mode("precomputed", {"kl_coef": 0.1}) == "params"
    with pytest.raises(ValueError, match="kl_coef > 0 needs"):
        losses.sami_objective(params, batch, config=config, kl_coef=0.5)


def _kl_numpy(h, w, hr, wr, targets):
    z, zr = (np.asarray(a, np.float64) @ np.asarray(b, np.float64) for a, b in ((h, w), (hr, wr)))
    lp = z - z.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = zr - zr.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.take_along_axis(lp, targets[..., None], -1)[..., 0],
            (np.exp(lp) * (lp - lq)).sum(-1))


@pytest.mark.parametrize("chunk", [0, 7, 16])
def test_token_kl_matches_numpy_full_and_chunked(chunk):
    from align_jax.losses.sami import token_logps_and_kl
    rng = np.random.default_rng(3)
    b, t, d, v = 2, 5, 6, 37  # 37: chunks of 7 and 16 leave a padded last chunk
    h, hr = (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32) for _ in range(2))
    w, wr = (jnp.asarray(rng.normal(size=(d, v)), jnp.float32) for _ in range(2))
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    logps, kl = token_logps_and_kl(h, w, hr, wr, targets, chunk_size=chunk)
    want_lp, want_kl = _kl_numpy(h, w, hr, wr, np.asarray(targets))
    # float32 log-softmax over 37 logits of size ~10: a few ulps of the logits' scale.
    np.testing.assert_allclose(logps, want_lp, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-4, atol=2e-5)
    assert np.all(np.asarray(kl) > 0)
    # The gradient: chunked equals full (jax.checkpoint and the two passes change nothing).
    loss = lambda h_, w_, c: jnp.sum(token_logps_and_kl(h_, w_, hr, wr, targets,  # noqa: E731
                                                        chunk_size=c)[1])
    g = jax.grad(loss, argnums=(0, 1))(h, w, chunk)
    g_full = jax.grad(loss, argnums=(0, 1))(h, w, 0)
    for a, b_ in zip(g, g_full):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_kl_term_is_a_kl_gradient_zero_at_the_base():
    """At params == base the KL and its gradient vanish (what a KL penalty does); the old
    log-ratio on sampled tokens had a nonzero gradient there (d/dθ mean log p)."""
    from align_jax.losses.sami import sami_logps_and_kl
    config = get_config("tiny", init_std=0.2)
    params = transformer.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    b, c, t = 1, 2, 6
    tokens = rng.integers(3, config.vocab_size, size=(b, c, c, t)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=-1),
             "loss_mask": np.tile([0, 0, 1, 1, 1, 0], (b, c, c, 1)).astype(np.float32),
             "segment_ids": np.ones((b, c, c, t), np.int32),
             "positions": np.broadcast_to(np.arange(t), (b, c, c, t)).astype(np.int32)}

    kl_and_grad = jax.jit(jax.value_and_grad(
        lambda p: sami_logps_and_kl(config, p, params, batch)[2].sum()))
    kl, grads = kl_and_grad(params)
    assert abs(float(kl)) < 1e-6
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads)) < 1e-5
    # Moved away from the base: positive, with a gradient.
    moved = jax.tree.map(lambda x: x * 1.3, params)
    kl, grads = kl_and_grad(moved)
    assert float(kl) > 1e-4
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads)) > 1e-5
    # The log-probs equal sami_logps's (one forward pass serves both).
    lp, mask_b, _ = sami_logps_and_kl(config, moved, params, batch)
    lp2, mask_b2 = losses.sami_logps(config, moved, batch)
    np.testing.assert_allclose(lp, lp2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask_b, mask_b2)
