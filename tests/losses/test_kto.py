"""KTO against an independent numpy implementation, pure and on a tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import losses
from align_jax.models import transformer
from align_jax.models.config import get_config


def _np_kto(pol, ref, pol_kl, ref_kl, labels, *, beta, wd, wu, mask=None):
    pol, ref, pol_kl, ref_kl = (np.asarray(a, np.float64) for a in (pol, ref, pol_kl, ref_kl))
    mask = np.ones_like(pol) if mask is None else np.asarray(mask, np.float64)
    z0 = max(0.0, ((pol_kl - ref_kl) * mask).sum() / mask.sum())
    r = pol - ref
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    out = np.where(labels > 0.5, wd * (1 - sig(beta * (r - z0))), wu * (1 - sig(beta * (z0 - r))))
    return out, z0


@pytest.mark.parametrize("kl_shift", [-3.0, 2.0])  # the clamp at 0 both active and not
def test_kto_loss_matches_numpy(kl_shift):
    rng = np.random.default_rng(0)
    n = 8
    pol, ref = rng.normal(size=n) * 5 - 30, rng.normal(size=n) * 5 - 30
    ref_kl = rng.normal(size=n) * 5 - 30
    pol_kl = ref_kl + kl_shift + rng.normal(size=n) * 0.5
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 1], np.float32)
    args = [jnp.asarray(a, jnp.float32) for a in (pol, ref, pol_kl, ref_kl, labels)]
    got, metrics = losses.kto_loss(*args, beta=0.3, desirable_weight=1.5,
                                   undesirable_weight=0.7, mask_B=jnp.asarray(mask))
    want, z0 = _np_kto(pol, ref, pol_kl, ref_kl, labels, beta=0.3, wd=1.5, wu=0.7, mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["kl"], z0, rtol=1e-5, atol=1e-6)
    assert (z0 == 0.0) == (kl_shift < 0)
    d = (labels > 0.5) & (mask > 0)
    np.testing.assert_allclose(metrics["rewards_desirable"], 0.3 * (pol - ref)[d].mean(),
                               rtol=1e-5)
    assert float(metrics["num_undesirable"]) == ((labels < 0.5) & (mask > 0)).sum()
    # z0 is a stop-gradiented reference point: no gradient reaches the KL log-probs.
    g = jax.grad(lambda x: jnp.sum(losses.kto_loss(args[0], args[1], x, args[3], args[4],
                                                   beta=0.3)[0]))(args[2])
    assert np.all(np.asarray(g) == 0.0)


def _seq(prompt, completion):
    seq = prompt + completion
    mask = [1.0 if i + 1 >= len(prompt) else 0.0 for i in range(len(seq) - 1)]
    return seq[:-1], seq[1:], mask


_PROMPTS = [[3, 4, 5], [10, 11], [20, 21, 22, 23], [30]]
_COMPLETIONS = [[6, 7, 2], [12, 13, 14, 2], [24, 2], [31, 32, 33]]
_LABELS = [1.0, 0.0, 1.0, 0.0]


def _kto_batch(t=8):
    b = len(_PROMPTS)
    out = {}
    for prefix, shift in (("", 0), ("kl_", 1)):
        for k in ("tokens", "targets", "positions", "segment_ids"):
            out[prefix + k] = np.zeros((b, t), np.int32)
        out[prefix + "loss_mask"] = np.zeros((b, t), np.float32)
        for i in range(b):
            # The KL rows pair each prompt with another row's completion.
            tok, tgt, mask = _seq(_PROMPTS[i], _COMPLETIONS[(i + shift) % b])
            n = len(tok)
            out[prefix + "tokens"][i, :n], out[prefix + "targets"][i, :n] = tok, tgt
            out[prefix + "loss_mask"][i, :n] = mask
            out[prefix + "segment_ids"][i, :n], out[prefix + "positions"][i, :n] = 1, np.arange(n)
    out["label"] = np.asarray(_LABELS, np.float32)
    return out


@functools.lru_cache
def _jit_forward(config):
    return jax.jit(lambda p, x, s: transformer.forward(config, p, x, segment_ids_BT=s))


def _np_seq_logps(config, params, batch, prefix):
    logits = _jit_forward(config)(params, batch[prefix + "tokens"],
                                  batch[prefix + "segment_ids"])
    x = np.asarray(logits, np.float64)
    lsm = x - x.max(-1, keepdims=True)
    lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
    lp = np.take_along_axis(lsm, batch[prefix + "targets"][..., None], -1)[..., 0]
    return (lp * batch[prefix + "loss_mask"]).sum(-1)


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny", init_std=0.2)
    params = transformer.init_params(config, jax.random.key(0))
    ref_params = transformer.init_params(config, jax.random.key(1))
    return config, params, ref_params


_KW = dict(beta=0.5, desirable_weight=1.2, undesirable_weight=0.8)


@functools.lru_cache
def _step(config):
    fn = functools.partial(losses.kto_objective, config=config, **_KW)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))


def test_kto_objective_matches_numpy(tiny):
    config, params, ref_params = tiny
    batch = _kto_batch()
    (loss, metrics), grads = _step(config)(params, batch, ref_params=ref_params)
    pol, pol_kl = (_np_seq_logps(config, params, batch, p) for p in ("", "kl_"))
    ref, ref_kl = (_np_seq_logps(config, ref_params, batch, p) for p in ("", "kl_"))
    want, z0 = _np_kto(pol, ref, pol_kl, ref_kl, batch["label"], beta=_KW["beta"],
                       wd=_KW["desirable_weight"], wu=_KW["undesirable_weight"])
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], z0, rtol=1e-5, atol=1e-6)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads))

    with pytest.raises(ValueError, match="ref_params"):
        losses.kto_objective(params, batch, config=config)
    bad = {k: v for k, v in batch.items() if k != "kl_targets"}
    with pytest.raises(KeyError, match="'kl_targets'"):
        losses.kto_objective(params, bad, config=config, ref_params=ref_params)


def test_kto_precomputed_reference_equals_ref_params(tiny):
    config, params, ref_params = tiny
    batch = _kto_batch()
    pre = jax.jit(functools.partial(losses.precompute_kto_ref_logps, config))(ref_params, batch)
    np.testing.assert_allclose(pre["ref_logps"], _np_seq_logps(config, ref_params, batch, ""),
                               rtol=1e-5)
    np.testing.assert_allclose(pre["ref_kl_logps"],
                               _np_seq_logps(config, ref_params, batch, "kl_"), rtol=1e-5)
    (loss_ref, _), g_ref = _step(config)(params, batch, ref_params=ref_params)
    (loss_pre, _), g_pre = _step(config)(params, {**batch, **pre})
    np.testing.assert_allclose(loss_pre, loss_ref, rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_pre)):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-7)
