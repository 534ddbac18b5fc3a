"""Invariants of the decoder: packing, causality, cache, remat, attention implementations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.models import transformer
from align_jax.models.config import get_config

CFG = get_config("tiny", vocab_size=101)


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(0))


def _tokens(rng, shape):
    return np.asarray(jax.random.randint(jax.random.key(rng), shape, 0, CFG.vocab_size))


def test_packed_segments_equal_separate_sequences(params):
    a, b = _tokens(1, (1, 7)), _tokens(2, (1, 5))
    packed = np.concatenate([a, b, np.zeros((1, 4), np.int32)], axis=1)
    segs = np.array([[1] * 7 + [2] * 5 + [0] * 4])
    logits = transformer.forward(CFG, params, packed, segment_ids_BT=segs)
    np.testing.assert_allclose(logits[:, :7], transformer.forward(CFG, params, a), atol=1e-5)
    np.testing.assert_allclose(logits[:, 7:12], transformer.forward(CFG, params, b), atol=1e-5)
    assert np.isfinite(np.asarray(logits)).all(), "padding rows must stay finite"


def test_positions_restart_per_segment():
    segs = jnp.array([[1, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    pos = transformer.positions_from_segments(segs)
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]])


def test_causal(params):
    t = _tokens(3, (2, 9))
    t2 = t.copy()
    t2[:, 6:] = (t2[:, 6:] + 1) % CFG.vocab_size
    l1 = transformer.forward(CFG, params, t)
    l2 = transformer.forward(CFG, params, t2)
    np.testing.assert_allclose(l1[:, :6], l2[:, :6], atol=1e-6)
    assert np.abs(np.asarray(l1[:, 6:] - l2[:, 6:])).max() > 1e-4


@pytest.mark.parametrize("window", [None, 3])
def test_cached_decode_equals_full_forward(params, window):
    cfg = dataclasses.replace(CFG, sliding_window=window)
    # Row 0 is left-padded by 3: its positions start at 0 at its first real token.
    t = _tokens(4, (2, 10))
    seg = np.ones_like(t)
    seg[0, :3] = 0
    pos = np.asarray(transformer.positions_from_segments(jnp.asarray(seg)))
    np.testing.assert_array_equal(pos[0, 3:], np.arange(7))
    full = transformer.forward(cfg, params, t, positions_BT=pos, segment_ids_BT=seg)
    cache = transformer.init_cache(cfg, 2, 16)
    logits, cache = transformer.forward_with_cache(
        cfg, params, t[:, :6], cache=cache, positions_BT=pos[:, :6], segment_ids_BT=seg[:, :6])
    np.testing.assert_allclose(logits[0, 3:], full[0, 3:6], atol=1e-5)
    np.testing.assert_allclose(logits[1], full[1, :6], atol=1e-5)
    for i in range(6, 10):
        step, cache = transformer.forward_with_cache(
            cfg, params, t[:, i:i + 1], cache=cache, positions_BT=pos[:, i:i + 1],
            segment_ids_BT=seg[:, i:i + 1])
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5)
    assert int(cache["index"]) == 10


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_loss_and_grads(params, remat):
    t = _tokens(5, (2, 8))

    def loss(p, cfg):
        return jnp.mean(transformer.forward(cfg, p, t) ** 2)

    g0 = jax.grad(loss)(params, CFG)
    g1 = jax.grad(loss)(params, dataclasses.replace(CFG, remat=remat))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_jax_attention_matches_reference(params):
    t = _tokens(6, (2, 9))
    seg = np.array([[1] * 5 + [2] * 4, [0] * 2 + [1] * 7])
    cfg = dataclasses.replace(CFG, sliding_window=4)
    ref = transformer.forward(cfg, params, t, segment_ids_BT=seg)
    got = transformer.forward(dataclasses.replace(cfg, attention="jax"), params, t,
                              segment_ids_BT=seg)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-5)


def test_bfloat16_compute_close_to_float32(params):
    t = _tokens(7, (2, 8))
    ref = transformer.forward(CFG, params, t)
    low = transformer.forward(dataclasses.replace(CFG, dtype="bfloat16"), params, t)
    assert low.dtype == jnp.float32
    assert np.abs(np.asarray(low - ref)).max() < 0.05 * np.abs(np.asarray(ref)).max() + 0.05


def test_gemma_details_change_output():
    # norm_offset and embedding scaling are live code paths: turning them off changes logits.
    cfg = dataclasses.replace(CFG, norm_offset=1.0, scale_embeddings=True,
                              activation="gelu_tanh")
    p = transformer.init_params(cfg, jax.random.key(1))
    t = _tokens(8, (1, 6))
    a = transformer.forward(cfg, p, t)
    b = transformer.forward(dataclasses.replace(cfg, scale_embeddings=False), p, t)
    assert np.abs(np.asarray(a - b)).max() > 1e-3


@pytest.mark.parametrize("window", [None, 3])
def test_splash_attention_matches_reference(params, window):
    # Off TPU the Pallas kernel runs in interpret mode: slow but the same algorithm.
    cfg = dataclasses.replace(CFG, sliding_window=window)
    t = _tokens(9, (2, 20))
    seg = np.array([[1] * 12 + [2] * 8, [0] * 5 + [1] * 15])
    ref = transformer.forward(cfg, params, t, segment_ids_BT=seg)
    got = transformer.forward(dataclasses.replace(cfg, attention="splash"), params, t,
                              segment_ids_BT=seg)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-4)
