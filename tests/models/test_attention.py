"""Every attention implementation runnable on CPU equals the XLA reference, values and gradients.

Inputs cover packed segments with padding, sliding windows, grouped (GQA) and single (MQA) kv
heads, and Gemma's head_dim of 256; the blockwise kernel is run with a block that does not
divide S, so its padded last block is exercised too.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.models import blockwise, layers, transformer
from align_jax.models.config import get_config

SEGS = np.array([[1] * 7 + [2] * 6 + [0] * 3,      # two packed documents, then padding
                 [0] * 4 + [1] * 12])              # left padding


def _inputs(n, k, h, seed=0):
    b, t = SEGS.shape
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kk = jax.random.normal(keys[1], (b, t, k, h))
    v = jax.random.normal(keys[2], (b, t, k, h))
    cot = jax.random.normal(keys[3], (b, t, n, h))
    return q, kk, v, cot


def _mask(window):
    slots = jnp.arange(SEGS.shape[1], dtype=jnp.int32)
    segs = jnp.asarray(SEGS)
    return layers.attention_mask(slots, slots, segs, segs, window=window)


def _value_and_grads(fn, q, k, v, cot):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cot))


@pytest.mark.parametrize("n,k,h,window", [(4, 2, 8, None), (4, 2, 8, 3), (6, 1, 8, 5),
                                          (2, 2, 256, None)],
                         ids=["gqa", "gqa-window", "mqa-window", "gemma-head-dim"])
@pytest.mark.parametrize("block", [5, 512])
def test_blockwise_equals_reference(n, k, h, window, block):
    q, kk, v, cot = _inputs(n, k, h)
    mask = _mask(window)
    scale = h ** -0.5
    ref = _value_and_grads(lambda *a: layers._attend_xla(*a, mask, scale), q, kk, v, cot)
    got = _value_and_grads(lambda *a: blockwise.attend(*a, mask, scale=scale, block=block),
                           q, kk, v, cot)
    # Padding rows included: both give them a uniform softmax over all keys.
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=name)


def test_blockwise_bfloat16_close_to_reference():
    q, kk, v, cot = (x.astype(jnp.bfloat16) for x in _inputs(4, 2, 8))
    mask = _mask(None)
    ref = _value_and_grads(lambda *a: layers._attend_xla(*a, mask, 0.35), q, kk, v, cot)
    got = _value_and_grads(lambda *a: blockwise.attend(*a, mask, scale=0.35, block=5),
                           q, kk, v, cot)
    for a, b in zip(got, ref):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=0.05, rtol=0.05)


def test_blockwise_backward_keeps_no_score_blocks():
    # The custom backward keeps q, k, v, mask, out and the softmax max and sum: nothing of
    # size T x S in float32 (the mask is bool).
    b, t, n, h = 1, 64, 2, 8
    q = jnp.ones((b, t, n, h))
    mask = jnp.ones((b, t, t), bool)
    _, res = blockwise._flash_fwd(q, q, q, mask, 1.0, 16, t)
    big = [x for x in jax.tree.leaves(res) if x.dtype == jnp.float32 and x.size >= t * t]
    assert not big, [x.shape for x in big]


CFG = dataclasses.replace(get_config("tiny", vocab_size=97), attention="xla")


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(0))


def _model_loss(cfg, params, tokens, segs):
    logits = transformer.forward(cfg, params, tokens, segment_ids_BT=segs)
    w = jnp.asarray(segs > 0, jnp.float32)[..., None]
    return jnp.sum(jnp.sin(logits) * w)


_grad = jax.jit(jax.value_and_grad(_model_loss, argnums=1), static_argnums=0)


@pytest.mark.parametrize("attention,window", [("auto", 4), ("blockwise", None), ("jax", 4)])
def test_model_paths_equal_reference(params, attention, window):
    # "auto" is blockwise on CPU; "jax" is jax.nn.dot_product_attention's XLA path.
    cfg = dataclasses.replace(CFG, sliding_window=window)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), SEGS.shape, 0, CFG.vocab_size))
    ref_l, ref_g = _grad(cfg, params, tokens, SEGS)
    got_l, got_g = _grad(dataclasses.replace(cfg, attention=attention), params, tokens, SEGS)
    np.testing.assert_allclose(got_l, ref_l, rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 4])
def test_splash_gradients_equal_reference(params, window):
    # Pallas interpret mode off TPU: the same algorithm as the TPU kernel, slowly.
    cfg = dataclasses.replace(CFG, sliding_window=window)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), SEGS.shape, 0, CFG.vocab_size))
    ref_l, ref_g = _grad(cfg, params, tokens, SEGS)
    got_l, got_g = _grad(dataclasses.replace(cfg, attention="splash"), params, tokens, SEGS)
    np.testing.assert_allclose(got_l, ref_l, rtol=1e-4, atol=1e-3)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def test_auto_resolves_per_platform():
    cfg = dataclasses.replace(CFG, attention="auto")
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    pick = layers.resolve_attention
    assert pick(cfg, cached=False, query_len=8, platform="cpu") == "blockwise"
    assert pick(bf16, cached=False, query_len=8, platform="gpu") == "cudnn"
    assert pick(cfg, cached=False, query_len=8, platform="gpu") == "blockwise"  # f32: no cuDNN
    assert pick(cfg, cached=False, query_len=8, platform="tpu") == "splash"
    # Cached prefill and decode read only the filled slots, on every platform.
    assert pick(bf16, cached=True, query_len=1, platform="gpu") == "filled"
    assert pick(bf16, cached=True, query_len=8, platform="tpu") == "filled"
    assert pick(cfg, cached=True, query_len=1, platform="cpu") == "filled"
    assert pick(dataclasses.replace(cfg, attention="splash"), cached=True, query_len=1) == "filled"
    assert pick(dataclasses.replace(cfg, attention="xla"), cached=False, query_len=8) == "xla"
    assert pick(dataclasses.replace(cfg, attention="xla"), cached=True, query_len=1) == "xla"
    assert get_config("llama3_1b").attention == "auto"


def _nan_cache(cfg, batch, slots):
    cache = transformer.init_cache(cfg, batch, slots)
    return {**cache, "k": jnp.full_like(cache["k"], jnp.nan),
            "v": jnp.full_like(cache["v"], jnp.nan)}


def _filled_inputs(n, k, h, s, t, q_start, left_pad, seed=0):
    """Queries at slots [q_start, q_start + t) of a 2-layer stacked cache of s slots whose
    slots past the filled length hold NaN; row 1 is left-padded by `left_pad` slots."""
    b, layers_ = 2, 2
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kk = jax.random.normal(keys[1], (layers_, b, s, k, h))
    v = jax.random.normal(keys[2], (layers_, b, s, k, h))
    filled = q_start + t
    kk, v = (x.at[:, :, filled:].set(jnp.nan) for x in (kk, v))
    seg = np.ones((b, s), np.int32)
    seg[:, filled:] = 0
    seg[1, :left_pad] = 0
    seg_q = seg[:, q_start:filled]
    slots_S = jnp.arange(s, dtype=jnp.int32)
    mask = layers.attention_mask(q_start + jnp.arange(t, dtype=jnp.int32), slots_S,
                                 jnp.asarray(seg_q), jnp.asarray(seg), window=None)
    return q, kk, v, seg, seg_q, mask


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("block", [4, 5, 128])
@pytest.mark.parametrize("q_start,t", [(0, 6), (6, 1), (12, 1), (9, 4), (16, 1)])
def test_filled_attention_equals_reference(window, block, q_start, t):
    # S = 17: block 4 and 5 leave a last block that is shifted back (overlapping one already
    # visited), block 128 is one block larger than S; q_start 16 fills the cache exactly.
    n, k, h, s = 4, 2, 8, 17
    q, kk, v, seg, seg_q, _ = _filled_inputs(n, k, h, s, t, q_start, left_pad=3)
    slots_S = jnp.arange(s, dtype=jnp.int32)
    mask = layers.attention_mask(q_start + jnp.arange(t, dtype=jnp.int32), slots_S,
                                 jnp.asarray(seg_q), jnp.asarray(seg), window=window)
    scale = h ** -0.5
    got = blockwise.attend_filled(q, kk, v, mask, layer=jnp.int32(1), q_start=jnp.int32(q_start),
                                  scale=scale, window=window, block=block)
    # The reference over the filled slots only (it would read the NaN ones: 0 * NaN).
    f = q_start + t
    ref = layers._attend_xla(q, kk[1, :, :f], v[1, :, :f], mask[:, :, :f], scale)
    assert np.all(np.isfinite(np.asarray(got)))
    # Real queries only: a padding query (sees no key) is uniform over whichever keys were
    # visited, and nobody reads it. Float32 sums in another order (blocks, online rescaling):
    # a few ulps of values of size ~1.
    real = seg_q > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=2e-6,
                               rtol=2e-6)


def test_filled_attention_skips_blocks_outside_the_window():
    # Blocks wholly before the window of the first query are not read: NaN there is harmless.
    n, k, h, s, t, q_start, block, window = 4, 2, 8, 17, 1, 14, 4, 3
    q, kk, v, seg, seg_q, _ = _filled_inputs(n, k, h, s, t, q_start, left_pad=0)
    mask = layers.attention_mask(q_start + jnp.arange(t, dtype=jnp.int32),
                                 jnp.arange(s, dtype=jnp.int32), jnp.asarray(seg_q),
                                 jnp.asarray(seg), window=window)
    clean = blockwise.attend_filled(q, kk, v, mask, layer=jnp.int32(0),
                                    q_start=jnp.int32(q_start), scale=0.3, window=window,
                                    block=block)
    # The window reaches slot 12 (block 3 = slots 12..15); blocks 0..2 are never visited.
    dirty_k, dirty_v = (x.at[:, :, :12].set(jnp.nan) for x in (kk, v))
    got = blockwise.attend_filled(q, dirty_k, dirty_v, mask, layer=jnp.int32(0),
                                  q_start=jnp.int32(q_start), scale=0.3, window=window,
                                  block=block)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(clean))


def test_cached_decode_with_auto_equals_reference_forward(params):
    cfg = dataclasses.replace(CFG, sliding_window=3)
    auto = dataclasses.replace(cfg, attention="auto")
    t = np.asarray(jax.random.randint(jax.random.key(4), (2, 10), 0, CFG.vocab_size))
    seg = np.ones_like(t)
    seg[0, :3] = 0
    pos = np.asarray(transformer.positions_from_segments(jnp.asarray(seg)))
    full = jax.jit(transformer.forward, static_argnums=0)(cfg, params, t, positions_BT=pos,
                                                          segment_ids_BT=seg)
    step_fn = jax.jit(transformer.forward_with_cache, static_argnums=0)
    # Slots not yet written hold NaN: the filled path must never read them (the reference
    # would, 0 * NaN).
    cache = _nan_cache(auto, 2, 16)
    # Prefill (T = 6) and decode (T = 1) both read only the filled slots.
    logits, cache = step_fn(
        auto, params, t[:, :6], cache=cache, positions_BT=pos[:, :6], segment_ids_BT=seg[:, :6])
    np.testing.assert_allclose(logits[0, 3:], full[0, 3:6], atol=1e-5)
    np.testing.assert_allclose(logits[1], full[1, :6], atol=1e-5)
    for i in range(6, 10):
        step, cache = step_fn(
            auto, params, t[:, i:i + 1], cache=cache, positions_BT=pos[:, i:i + 1],
            segment_ids_BT=seg[:, i:i + 1])
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5)


def test_remat_attn_mlp_policy_same_grads(params):
    tokens = np.asarray(jax.random.randint(jax.random.key(2), SEGS.shape, 0, CFG.vocab_size))
    auto = dataclasses.replace(CFG, attention="auto", remat="none")
    _, ref = _grad(auto, params, tokens, SEGS)
    _, got = _grad(dataclasses.replace(auto, remat="attn_mlp"), params, tokens, SEGS)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
