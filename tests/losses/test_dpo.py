"""DPO family: closed forms, numpy references, and the objective's batch layouts."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import losses
from align_jax.models import transformer
from align_jax.models.config import get_config

# ---------------------------------------------------------------- numpy references


def _np_logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _np_dpo(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, gamma=0.0, reference_free=False):
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    if reference_free or loss_type == "simpo":
        rc, rr = 0 * rc, 0 * rr
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * _np_logsig(beta * h) - eps * _np_logsig(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * _np_logsig(beta * h) + eps * _np_logsig(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    z = beta * (pc - pr) - gamma
    return -(1 - eps) * _np_logsig(z) - eps * _np_logsig(-z)


def _rand(n=16, seed=0, scale=20.0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=n) * scale - 50).astype(np.float32) for _ in range(4)]


# ---------------------------------------------------------------- dpo_loss


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_policy_equals_reference_gives_closed_forms(beta):
    pc, pr, _, _ = _rand()
    args = [jnp.asarray(a) for a in (pc, pr, pc, pr)]  # reference == policy
    for loss_type, eps, want in [("sigmoid", 0.0, math.log(2)), ("sigmoid", 0.2, math.log(2)),
                                 ("robust", 0.0, math.log(2)), ("robust", 0.3, math.log(2)),
                                 ("hinge", 0.0, 1.0), ("ipo", 0.0, (1 / (2 * beta)) ** 2)]:
        got, metrics = losses.dpo_loss(*args, beta=beta, loss_type=loss_type,
                                       label_smoothing=eps)
        np.testing.assert_allclose(got, np.full(16, want), rtol=1e-6, err_msg=loss_type)
        assert float(metrics["margin"]) == 0.0
        assert float(metrics["accuracy"]) == 0.0
    # SimPO at equal (length-averaged) policy log-probs: -log sigmoid(-gamma) = softplus(gamma).
    for gamma in (0.0, 0.5, 2.0):
        got, _ = losses.dpo_loss(jnp.asarray(pc), jnp.asarray(pc), jnp.asarray(pr),
                                 jnp.asarray(pc), beta=beta, loss_type="simpo", gamma=gamma)
        np.testing.assert_allclose(got, np.full(16, math.log1p(math.exp(gamma))), rtol=1e-6)


@pytest.mark.parametrize("loss_type,eps,gamma", [
    ("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, 0.0), ("robust", 0.0, 0.0), ("robust", 0.25, 0.0),
    ("hinge", 0.0, 0.0), ("ipo", 0.0, 0.0), ("simpo", 0.0, 0.8), ("simpo", 0.1, 0.3)])
@pytest.mark.parametrize("beta", [0.05, 0.3])
def test_random_inputs_match_numpy(loss_type, eps, gamma, beta):
    pc, pr, rc, rr = _rand(seed=hash((loss_type, eps, beta)) % 1000)
    got, metrics = losses.dpo_loss(*(jnp.asarray(a) for a in (pc, pr, rc, rr)), beta=beta,
                                   loss_type=loss_type, label_smoothing=eps, gamma=gamma)
    want = _np_dpo(pc, pr, rc, rr, beta=beta, loss_type=loss_type, eps=eps, gamma=gamma)
    assert got.shape == (16,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    if loss_type == "simpo":
        rc, rr = 0 * rc, 0 * rr
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    np.testing.assert_allclose(metrics["rewards_chosen"], r_c.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards_rejected"], r_r.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["margin"], (r_c - r_r).mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], (r_c > r_r).mean())


def test_sigmoid_gradient_matches_closed_form():
    pc, pr, rc, rr = _rand(n=5, scale=3.0)
    beta, eps = 0.4, 0.15
    g = jax.grad(lambda x: jnp.sum(losses.dpo_loss(
        x, jnp.asarray(pr), jnp.asarray(rc), jnp.asarray(rr), beta=beta,
        label_smoothing=eps)[0]))(jnp.asarray(pc))
    z = beta * ((pc - rc) - (pr - rr)).astype(np.float64)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    want = -(1 - eps) * beta * sig(-z) + eps * beta * sig(z)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_reference_free_ignores_reference():
    pc, pr, rc, rr = _rand(seed=3)
    got, metrics = losses.dpo_loss(*(jnp.asarray(a) for a in (pc, pr, rc, rr)), beta=0.2,
                                   reference_free=True)
    np.testing.assert_allclose(got, _np_dpo(pc, pr, 0 * rc, 0 * rr, beta=0.2,
                                            loss_type="sigmoid"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards_chosen"], 0.2 * pc.mean(), rtol=1e-5)
    with_ref, _ = losses.dpo_loss(*(jnp.asarray(a) for a in (pc, pr, rc, rr)), beta=0.2)
    assert not np.allclose(got, with_ref)


def test_weights_only_change_metric_means():
    pc, pr, rc, rr = _rand(n=4, seed=4)
    w = np.array([1, 0, 1, 0], np.float32)
    _, metrics = losses.dpo_loss(*(jnp.asarray(a) for a in (pc, pr, rc, rr)),
                                 weights_B=jnp.asarray(w))
    r_c = 0.1 * (pc - rc)
    np.testing.assert_allclose(metrics["rewards_chosen"], r_c[[0, 2]].mean(), rtol=1e-5)


def test_bad_options_raise():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(x, x, x, x, loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="robust"):
        losses.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="gamma"):
        losses.dpo_loss(x, x, x, x, loss_type="sigmoid", gamma=1.0)
    with pytest.raises(ValueError, match="beta"):
        losses.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        losses.dpo_loss(x, x, x, jnp.zeros(4))


# ---------------------------------------------------------------- the objective on a tiny model

_PAIRS = [  # (prompt, chosen, rejected) token ids
    ([5, 17, 33], [40, 41, 2], [77, 2]),
    ([9, 100], [200, 201, 202, 2], [300, 2]),
    ([11, 12, 13, 14], [15, 2], [150, 151, 152, 2]),
    ([21], [22, 23, 24], [25, 26]),
]


def _seq(prompt, response):
    seq = prompt + response
    mask = [1.0 if i + 1 >= len(prompt) else 0.0 for i in range(len(seq) - 1)]
    return seq[:-1], seq[1:], mask


def _padded_batch(pairs, t=10):
    b = len(pairs)
    out = {k: np.zeros((b, 2, t), np.int32) for k in ("tokens", "targets", "positions",
                                                      "segment_ids")}
    out["loss_mask"] = np.zeros((b, 2, t), np.float32)
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        for p, resp in enumerate((chosen, rejected)):
            tok, tgt, mask = _seq(prompt, resp)
            n = len(tok)
            out["tokens"][i, p, :n], out["targets"][i, p, :n] = tok, tgt
            out["loss_mask"][i, p, :n] = mask
            out["segment_ids"][i, p, :n] = 1
            out["positions"][i, p, :n] = np.arange(n)
    return out


def _packed_batch(pairs, rows, t=24, m=3):
    """rows: list of lists of (pair index, rejected_first) placed in that row."""
    b = len(rows)
    out = {k: np.zeros((b, t), np.int32) for k in ("tokens", "targets", "positions",
                                                   "segment_ids")}
    out["loss_mask"] = np.zeros((b, t), np.float32)
    out["chosen_segment"] = np.zeros((b, m), np.int32)
    out["rejected_segment"] = np.zeros((b, m), np.int32)
    out["pair_mask"] = np.zeros((b, m), np.float32)
    for r, row in enumerate(rows):
        cursor, seg = 0, 0
        for slot, (i, rejected_first) in enumerate(row):
            prompt, chosen, rejected = pairs[i]
            order = [("rejected", rejected), ("chosen", chosen)]
            for name, resp in (order if rejected_first else order[::-1]):
                seg += 1
                tok, tgt, mask = _seq(prompt, resp)
                n = len(tok)
                sl = slice(cursor, cursor + n)
                out["tokens"][r, sl], out["targets"][r, sl] = tok, tgt
                out["loss_mask"][r, sl] = mask
                out["segment_ids"][r, sl] = seg
                out["positions"][r, sl] = np.arange(n)
                out[name + "_segment"][r, slot] = seg
                cursor += n
            out["pair_mask"][r, slot] = 1.0
        assert cursor <= t
    return out


# Pair 2 then 0 in row 0 (pair 0 rejected first), pair 1 then 3 in row 1; slot 2 stays empty.
_ROWS = [[(2, False), (0, True)], [(1, False), (3, False)]]
_ORDER = [2, 0, 1, 3]


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny", init_std=0.2)
    params = transformer.init_params(config, jax.random.key(0))
    ref_params = transformer.init_params(config, jax.random.key(1))
    return config, params, ref_params


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@functools.lru_cache
def _jit_forward(config):
    return jax.jit(lambda p, x, s: transformer.forward(config, p, x, segment_ids_BT=s))


def _np_pair_logps(config, params, batch):
    """Per-pair summed log-probs and token counts, from full logits, in numpy."""
    b, _, t = batch["tokens"].shape
    logits = _jit_forward(config)(params, batch["tokens"].reshape(2 * b, t),
                                  batch["segment_ids"].reshape(2 * b, t))
    lp = np.take_along_axis(_np_log_softmax(logits), batch["targets"].reshape(2 * b, t)[..., None],
                            -1)[..., 0].reshape(b, 2, t)
    return (lp * batch["loss_mask"]).sum(-1), batch["loss_mask"].sum(-1)


def _value_and_grad(config, **kw):
    return _cached_step(config, tuple(sorted(kw.items())))


@functools.lru_cache
def _cached_step(config, kw_items):
    # One jitted function per option set, so tests that share options share compilations.
    fn = functools.partial(losses.dpo_objective, config=config, **dict(kw_items))
    return jax.jit(jax.value_and_grad(fn, has_aux=True))


_RPO = dict(beta=0.2, rpo_alpha=0.5)


def test_objective_matches_numpy_with_rpo(tiny):
    config, params, ref_params = tiny
    batch = _padded_batch(_PAIRS)
    beta, alpha = _RPO["beta"], _RPO["rpo_alpha"]
    (loss, metrics), _ = _value_and_grad(config, **_RPO)(
        params, {**batch, "ref_logps": np.zeros((4, 2), np.float32)})
    pol, counts = _np_pair_logps(config, params, batch)
    # With precomputed zero references the loss is reference-free DPO on the same pairs.
    want_dpo = _np_dpo(pol[:, 0], pol[:, 1], 0, 0, beta=beta, loss_type="sigmoid").mean()
    want_nll = -pol[:, 0].sum() / counts[:, 0].sum()
    np.testing.assert_allclose(metrics["dpo_loss"], want_dpo, rtol=1e-5)
    np.testing.assert_allclose(metrics["rpo_nll"], want_nll, rtol=1e-5)
    np.testing.assert_allclose(loss, want_dpo + alpha * want_nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards_chosen"], beta * pol[:, 0].mean(), rtol=1e-5)
    assert float(metrics["num_pairs"]) == 4.0


def test_objective_ipo_length_averaged_matches_numpy(tiny):
    config, params, _ = tiny
    batch = _padded_batch(_PAIRS)
    ref = np.random.default_rng(5).normal(size=(4, 2)).astype(np.float32) * 3 - 25
    fn = functools.partial(losses.dpo_objective, config=config, beta=0.25, loss_type="ipo",
                           average_logps=True)
    loss, _ = jax.jit(fn)(params, {**batch, "ref_logps": ref})
    pol, counts = _np_pair_logps(config, params, batch)
    want = _np_dpo(*(pol / counts).T, *(ref / counts).T, beta=0.25, loss_type="ipo").mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_objective_policy_equals_reference_is_ln2(tiny):
    config, params, _ = tiny
    (_, metrics), grads = _value_and_grad(config, **_RPO)(params, _padded_batch(_PAIRS),
                                                          ref_params=params)
    np.testing.assert_allclose(metrics["dpo_loss"], math.log(2), rtol=1e-6)
    # The reference is stop-gradiented: the policy still gets a gradient.
    assert float(jnp.abs(grads["embedding"]).sum()) > 0


@pytest.mark.parametrize("kw", [_RPO, dict(loss_type="simpo",
                                                                      beta=2.0, gamma=0.3)])
def test_packed_equals_padded_loss_and_grads(tiny, kw):
    config, params, ref_params = tiny
    padded = _padded_batch([_PAIRS[i] for i in _ORDER])
    packed = _packed_batch(_PAIRS, _ROWS)
    step = _value_and_grad(config, **kw)
    (l_pad, m_pad), g_pad = step(params, padded, ref_params=ref_params)
    (l_pack, m_pack), g_pack = step(params, packed, ref_params=ref_params)
    np.testing.assert_allclose(l_pack, l_pad, rtol=1e-5)
    for key in ("rewards_chosen", "rewards_rejected", "accuracy", "num_pairs"):
        np.testing.assert_allclose(m_pack[key], m_pad[key], rtol=1e-5, atol=1e-6, err_msg=key)
    flat_pad, flat_pack = jax.tree.leaves(g_pad), jax.tree.leaves(g_pack)
    assert any(float(jnp.abs(g).max()) > 1e-4 for g in flat_pad)
    for a, c in zip(flat_pad, flat_pack):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)


def test_ref_params_equals_precomputed_ref_logps(tiny):
    config, params, ref_params = tiny
    padded = _padded_batch(_PAIRS)
    packed = _packed_batch(_PAIRS, _ROWS)
    precompute = jax.jit(functools.partial(losses.precompute_ref_logps, config))
    ref_pad = np.asarray(precompute(ref_params, padded))
    ref_pack = np.asarray(precompute(ref_params, packed))
    want, _ = _np_pair_logps(config, ref_params, padded)
    np.testing.assert_allclose(ref_pad, want, rtol=1e-5)
    assert ref_pack.shape == (2, 3, 2)
    np.testing.assert_allclose(ref_pack[:, :2].reshape(4, 2), want[_ORDER], rtol=1e-5)
    np.testing.assert_array_equal(ref_pack[:, 2], 0.0)

    step = _value_and_grad(config, **_RPO)
    (l_ref, _), g_ref = step(params, padded, ref_params=ref_params)
    (l_pre, _), g_pre = step(params, {**padded, "ref_logps": ref_pad})
    np.testing.assert_allclose(l_pre, l_ref, rtol=1e-6)
    pol, counts = _np_pair_logps(config, params, padded)
    want_loss = _np_dpo(*pol.T, *want.T, beta=0.2, loss_type="sigmoid").mean()
    want_loss += 0.5 * -pol[:, 0].sum() / counts[:, 0].sum()
    np.testing.assert_allclose(l_ref, want_loss, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_pre)):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-7)


def test_objective_errors_name_the_problem(tiny):
    config, params, _ = tiny
    batch = _padded_batch(_PAIRS[:1])
    with pytest.raises(ValueError, match="ref_params"):
        losses.dpo_objective(params, batch, config=config)
    with pytest.raises(ValueError, match=r"'ref_logps' has shape \(3,\)"):
        losses.dpo_objective(params, {**batch, "ref_logps": np.zeros(3, np.float32)},
                             config=config)
    flat = {k: v[:, 0] for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"\[B, 2, T\]"):
        losses.dpo_objective(params, flat, config=config, reference_free=True)
    packed = _packed_batch(_PAIRS, _ROWS)
    del packed["pair_mask"]
    with pytest.raises(KeyError, match="'pair_mask'"):
        losses.dpo_objective(params, packed, config=config, reference_free=True)


@pytest.mark.slow
def test_sharded_objective_equals_single_device(tiny):
    config, params, ref_params = tiny
    from align_jax import sharding

    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    batch = _padded_batch(_PAIRS)
    (want, _), g_want = _value_and_grad(config, **_RPO)(params, batch, ref_params=ref_params)
    place = lambda tree: jax.tree.map(  # noqa: E731
        lambda x, s: jax.device_put(x, s), tree,
        sharding.tree_shardings(transformer.abstract_params(config), mesh, "fsdp_tp"))
    sharded_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, "fsdp_tp", v.ndim))
                     for k, v in batch.items()}
    fn = functools.partial(losses.dpo_objective, config=config, **_RPO)
    with sharding.use_mesh(mesh, "fsdp_tp"):
        (got, _), g_got = jax.jit(jax.value_and_grad(fn, has_aux=True))(
            place(params), sharded_batch, ref_params=place(ref_params))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)
