"""Token / sequence log-probs against numpy, masking gradients, chunked-vocab parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import losses
from align_jax.models import transformer
from align_jax.models.config import get_config


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _random(b=3, t=7, v=11, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    mask[0] = 0.0  # a row with nothing scored
    return logits, targets, mask


def test_token_logps_matches_numpy():
    logits, targets, _ = _random()
    got = losses.token_logps(jnp.asarray(logits), jnp.asarray(targets))
    want = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_numpy(average):
    logits, targets, mask = _random()
    got = losses.sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                average=average)
    lp = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    want = (lp * mask).sum(-1)
    if average:
        want = want / np.maximum(mask.sum(-1), 1)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(got[0]) == 0.0


def test_sequence_logps_bf16_logits_computed_in_float32():
    logits, targets, mask = _random(v=301)
    got = losses.sequence_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets),
                                jnp.asarray(mask))
    assert got.dtype == jnp.float32
    lp = np.take_along_axis(
        _np_log_softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)),
        targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, (lp * mask).sum(-1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_masked_positions_get_exactly_zero_grad(average):
    logits, targets, mask = _random()
    # Extreme logits at a masked position must not leak either.
    logits[1, np.argmin(mask[1])] = 1e30
    g = jax.grad(lambda x: jnp.sum(losses.sequence_logps(
        x, jnp.asarray(targets), jnp.asarray(mask), average=average)))(jnp.asarray(logits))
    g = np.asarray(g)
    assert np.all(g[mask == 0] == 0.0)
    assert np.all(np.abs(g[mask == 1]).sum(-1) > 0)
    # The gradient at a scored position is (one-hot - softmax) / count.
    b, t = np.argwhere(mask == 1)[0]
    p = np.exp(_np_log_softmax(logits[b, t]))
    want = -p
    want[targets[b, t]] += 1
    if average:
        want = want / mask[b].sum()
    np.testing.assert_allclose(g[b, t], want, rtol=1e-5, atol=1e-6)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="mask shape"):
        losses.sequence_logps(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32),
                              jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_token_logps(jnp.zeros((1, 2, 4)), jnp.zeros((4, 9)),
                                   jnp.zeros((1, 2), jnp.int32), chunk_size=0)


@pytest.mark.parametrize("chunk_size", [5, 16, 50, 64, 1000])
def test_chunked_token_logps_equals_unchunked(chunk_size):
    rng = np.random.default_rng(1)
    b, t, d, v = 2, 5, 8, 64
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)

    @jax.jit
    def full(h, w):
        logits = jnp.einsum("BTD,DV->BTV", h, w)
        return losses.token_logps(logits, targets)

    @jax.jit
    def chunked(h, w):
        return losses.chunked_token_logps(h, w, targets, chunk_size=chunk_size)

    np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-5, atol=1e-5)
    want = np.take_along_axis(_np_log_softmax(np.einsum("btd,dv->btv", h, w)),
                              np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(chunked(h, w), want, rtol=1e-5, atol=1e-5)
    grad = lambda f: jax.jit(jax.grad(lambda h, w: jnp.sum(f(h, w) * cot), argnums=(0, 1)))  # noqa: E731
    g_full, g_chunk = grad(full)(h, w), grad(chunked)(h, w)
    for a, c in zip(g_full, g_chunk):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)


def test_chunked_never_materialises_full_vocab_logits():
    b, t, d, v, chunk = 2, 4, 8, 4096, 256
    h = jnp.ones((b, t, d), jnp.float32)
    w = jnp.ones((d, v), jnp.float32)
    targets = jnp.zeros((b, t), jnp.int32)
    fn = jax.grad(lambda h, w: jnp.sum(losses.chunked_token_logps(h, w, targets,
                                                                  chunk_size=chunk)),
                  argnums=(0, 1))
    jaxpr = jax.make_jaxpr(fn)(h, w)
    too_big = []

    def walk(jp):
        for eqn in jp.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                if len(shape) >= 2 and np.prod(shape) >= b * t * v:
                    too_big.append((eqn.primitive.name, shape))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    # Only the [D, V] weight and its gradient may be V-sized; nothing of size B*T*V.
    assert all(np.prod(s) == d * v for _, s in too_big), too_big


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny", init_std=0.2)
    return config, transformer.init_params(config, jax.random.key(0))


def test_forward_token_logps_full_and_chunked_match_numpy(tiny):
    config, params = tiny
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, config.vocab_size, size=(2, 3, 6)).astype(np.int32)
    targets = rng.integers(0, config.vocab_size, size=(2, 3, 6)).astype(np.int32)
    mask = (rng.random((2, 3, 6)) < 0.7).astype(np.float32)
    seg = np.ones_like(tokens)
    seg[0, 1, 4:] = 0  # padding is never scored even if loss_mask says so
    mask[0, 1, 4:] = 1.0
    batch = {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": seg}
    logits = transformer.forward(config, params, tokens.reshape(6, 6),
                                 segment_ids_BT=seg.reshape(6, 6))
    lp = np.take_along_axis(_np_log_softmax(logits), targets.reshape(6, 6)[..., None],
                            -1)[..., 0].reshape(2, 3, 6)
    want_mask = mask * (seg != 0)
    for chunk in (0, 100):
        got, got_mask = losses.forward_token_logps(config, params, batch,
                                                   vocab_chunk_size=chunk)
        assert got.shape == (2, 3, 6)
        np.testing.assert_array_equal(got_mask, want_mask)
        np.testing.assert_allclose(got, lp * want_mask, rtol=1e-5, atol=1e-5)


def test_forward_token_logps_names_missing_field(tiny):
    config, params = tiny
    with pytest.raises(KeyError, match="'kl_loss_mask'"):
        losses.forward_token_logps(
            config, params, {"kl_tokens": np.zeros((1, 4), np.int32),
                             "kl_targets": np.zeros((1, 4), np.int32)}, prefix="kl_")
