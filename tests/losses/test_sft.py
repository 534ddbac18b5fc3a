"""SFT / causal-LM NLL: numpy reference, masking, packed == padded."""

import functools

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


def test_nll_loss_matches_numpy_and_masked_grad_is_zero():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 13)).astype(np.float32) * 2
    targets = rng.integers(0, 13, size=(3, 6)).astype(np.int32)
    mask = (rng.random((3, 6)) < 0.5).astype(np.float32)
    mask[0, 0] = 1.0
    lp = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    want = -(lp * mask).sum() / mask.sum()
    (loss, metrics), g = jax.value_and_grad(
        lambda x: losses.nll_loss(x, jnp.asarray(targets), jnp.asarray(mask)), has_aux=True)(
            jnp.asarray(logits))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(metrics["num_tokens"]) == mask.sum()
    g = np.asarray(g)
    assert np.all(g[mask == 0] == 0.0)
    assert np.all(np.abs(g[mask == 1]).sum(-1) > 0)
    # Nothing scored: loss 0, not nan.
    empty, _ = losses.nll_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((3, 6)))
    assert float(empty) == 0.0


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny", init_std=0.2)
    return config, transformer.init_params(config, jax.random.key(0))


_EXAMPLES = [([3, 4, 5], [6, 7, 2]), ([10, 11], [12, 13, 14, 15, 2]), ([20, 21, 22, 23], [24, 2])]


def _seq(prompt, completion):
    seq = prompt + completion
    mask = [1.0 if i + 1 >= len(prompt) else 0.0 for i in range(len(seq) - 1)]
    return seq[:-1], seq[1:], mask


def _padded(t=8):
    b = len(_EXAMPLES)
    out = {k: np.zeros((b, t), np.int32) for k in ("tokens", "targets", "positions",
                                                   "segment_ids")}
    out["loss_mask"] = np.zeros((b, t), np.float32)
    for i, ex in enumerate(_EXAMPLES):
        tok, tgt, mask = _seq(*ex)
        n = len(tok)
        out["tokens"][i, :n], out["targets"][i, :n], out["loss_mask"][i, :n] = tok, tgt, mask
        out["segment_ids"][i, :n], out["positions"][i, :n] = 1, np.arange(n)
    return out


def _packed(t=20):
    out = {k: np.zeros((1, t), np.int32) for k in ("tokens", "targets", "positions",
                                                   "segment_ids")}
    out["loss_mask"] = np.zeros((1, t), np.float32)
    cursor = 0
    for seg, ex in enumerate(_EXAMPLES, start=1):
        tok, tgt, mask = _seq(*ex)
        sl = slice(cursor, cursor + len(tok))
        out["tokens"][0, sl], out["targets"][0, sl], out["loss_mask"][0, sl] = tok, tgt, mask
        out["segment_ids"][0, sl], out["positions"][0, sl] = seg, np.arange(len(tok))
        cursor += len(tok)
    return out


@functools.lru_cache
def _jit_forward(config):
    return jax.jit(lambda p, x, s: transformer.forward(config, p, x, segment_ids_BT=s))


@functools.lru_cache
def _step(config, name, vocab_chunk_size=0):
    fn = functools.partial(getattr(losses, name), config=config,
                           vocab_chunk_size=vocab_chunk_size)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))


def test_sft_loss_matches_numpy(tiny):
    config, params = tiny
    batch = _padded()
    (loss, metrics), _ = _step(config, "sft_loss")(params, batch)
    logits = _jit_forward(config)(params, batch["tokens"], batch["segment_ids"])
    lp = np.take_along_axis(_np_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    want = -(lp * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(want), rtol=1e-5)


def test_sft_packed_equals_padded_and_ignores_masked_targets(tiny):
    config, params = tiny
    step = _step(config, "sft_loss")
    (l_pad, _), g_pad = step(params, _padded())
    (l_pack, m_pack), g_pack = step(params, _packed())
    np.testing.assert_allclose(l_pack, l_pad, rtol=1e-5)
    assert float(m_pack["num_tokens"]) == sum(len(c) for _, c in _EXAMPLES)
    for a, c in zip(jax.tree.leaves(g_pad), jax.tree.leaves(g_pack)):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)
    # Changing the targets at unscored positions (prompt and padding) changes nothing at all.
    batch = _packed()
    scrambled = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"], 499))
    assert not np.array_equal(scrambled["targets"], batch["targets"])
    (l_s, _), g_s = step(params, scrambled)
    assert float(l_s) == float(l_pack)
    for a, c in zip(jax.tree.leaves(g_pack), jax.tree.leaves(g_s)):
        np.testing.assert_array_equal(c, a)


def test_lm_loss_scores_every_real_token(tiny):
    config, params = tiny
    batch = _packed()
    # Raw text: drop the completion mask; every real position is scored.
    raw = {k: v for k, v in batch.items() if k != "loss_mask"}
    (loss, metrics), _ = _step(config, "lm_loss")(params, raw)
    logits = _jit_forward(config)(params, batch["tokens"], batch["segment_ids"])
    lp = np.take_along_axis(_np_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    real = batch["segment_ids"] != 0
    np.testing.assert_allclose(loss, -lp[real].mean(), rtol=1e-5)
    assert float(metrics["num_tokens"]) == real.sum()
    with pytest.raises(KeyError, match="segment_ids"):
        losses.lm_loss(params, {"tokens": batch["tokens"], "targets": batch["targets"]},
                       config=config)


def test_sft_vocab_chunked_equals_full(tiny):
    config, params = tiny
    batch = _packed()
    (l_full, _), g_full = _step(config, "sft_loss")(params, batch)
    (l_chunk, _), g_chunk = _step(config, "sft_loss", 100)(params, batch)  # 100 does not divide V
    np.testing.assert_allclose(l_chunk, l_full, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)
