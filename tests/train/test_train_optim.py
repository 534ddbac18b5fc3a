"""Optimizers: the weight-decay mask and the learning-rate schedules, against numpy."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from train_fixtures import tiny_config

from align_jax.models import transformer
from align_jax.train import optim

# Independent of optim._decays: the tiny model's parameters that carry weight decay.
_DECAYED = {"embedding", "lm_head", "layers/attn/q_proj", "layers/attn/k_proj",
            "layers/attn/v_proj", "layers/attn/o_proj", "layers/mlp/gate", "layers/mlp/up",
            "layers/mlp/down"}


def _flat(tree):
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def params():
    cfg = tiny_config(qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=False)
    return cfg, transformer.init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("name", ["adamw", "rmsprop", "adafactor"])
def test_weight_decay_skips_norms_and_biases(params, name):
    cfg, p = params
    lr, wd = 0.1, 0.5
    tx, _ = optim.make_optimizer(
        optim.OptimizerConfig(name=name, learning_rate=lr, weight_decay=wd, schedule="constant",
                              clip_norm=None), num_steps=10)
    state = tx.init(p)
    zeros = jax.tree.map(np.zeros_like, p)
    # With zero gradients the only update left is the decoupled decay, -lr * wd * p.
    updates, _ = tx.update(zeros, state, p)
    flat_p, flat_u = _flat(p), _flat(updates)
    assert any(k.endswith("bias") for k in flat_p) and any("norm" in k for k in flat_p)
    for k, value in flat_p.items():
        expected = -lr * wd * np.asarray(value) if k in _DECAYED else np.zeros_like(value)
        np.testing.assert_allclose(flat_u[k], expected, rtol=1e-6, atol=1e-8, err_msg=k)


def test_mask_is_the_same_on_boxed_abstract_params(params):
    cfg, p = params
    boxed = optim.weight_decay_mask(transformer.abstract_params(cfg))
    plain = optim.weight_decay_mask(p)
    assert _flat(boxed) == _flat(plain)
    assert {k for k, v in _flat(plain).items() if v} == _DECAYED
    # Optax initialises over the boxed tree and keeps the boxes (the shardings rely on it).
    tx, _ = optim.make_optimizer(optim.OptimizerConfig(weight_decay=0.1), num_steps=10)
    abstract_opt = jax.eval_shape(tx.init, transformer.abstract_params(cfg))
    boxes = [x for x in jax.tree.leaves(abstract_opt, is_leaf=lambda x: isinstance(
        x, nn.LogicallyPartitioned)) if isinstance(x, nn.LogicallyPartitioned)]
    assert len(boxes) == 2 * len(jax.tree.leaves(p))  # Adam's mu and nu


def _numpy_schedule(kind, steps, *, peak, warmup, total, end_ratio):
    end = peak * end_ratio
    out = []
    for s in steps:
        if s < warmup:
            out.append(peak * s / warmup)
            continue
        t = min(s - warmup, total - warmup) / (total - warmup)
        if kind == "cosine":
            out.append(end + (peak - end) * 0.5 * (1 + np.cos(np.pi * t)))
        elif kind == "linear":
            out.append(peak + (end - peak) * t)
        else:
            out.append(peak)
    return np.asarray(out)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedules_match_numpy(kind, warmup):
    steps = [0, 1, 5, 9, 10, 11, 37, 50, 99, 100, 150]
    cfg = optim.OptimizerConfig(learning_rate=3e-4, schedule=kind, warmup_steps=warmup,
                                end_lr_ratio=0.1)
    sched = optim.make_schedule(cfg, num_steps=100)
    got = np.asarray([float(sched(s)) for s in steps])
    want = _numpy_schedule(kind, steps, peak=3e-4, warmup=warmup, total=100, end_ratio=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_decay_steps_override_and_bad_settings():
    cfg = optim.OptimizerConfig(learning_rate=1.0, schedule="linear", decay_steps=20)
    sched = optim.make_schedule(cfg, num_steps=1000)
    assert float(sched(10)) == pytest.approx(0.5)
    assert float(sched(500)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule(optim.OptimizerConfig(warmup_steps=50), num_steps=50)
    with pytest.raises(ValueError, match="name"):
        optim.OptimizerConfig(name="sgd")


def test_warmup_ratio_rounds_up_like_the_hugging_face_trainer():
    # The value-alignment paper's SFT: 10% warmup. ceil(0.1 * 95) = 10 steps, then cosine.
    cfg = optim.OptimizerConfig(learning_rate=1e-6, schedule="cosine", warmup_ratio=0.1)
    assert optim.warmup_steps(cfg, num_steps=95) == 10
    assert optim.warmup_steps(cfg, num_steps=100) == 10
    assert optim.warmup_steps(dataclasses.replace(cfg, decay_steps=41), num_steps=7) == 5
    steps = [0, 3, 9, 10, 11, 50, 94]
    got = np.asarray([float(optim.make_schedule(cfg, num_steps=95)(s)) for s in steps])
    want = _numpy_schedule("cosine", steps, peak=1e-6, warmup=10, total=95, end_ratio=0.0)
    # The schedule is float32: a few float32 ulps of the peak.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * 1e-6)
    # As in Hugging Face's Trainer, warmup steps override the ratio (sft_tiny.gin over sft.gin).
    assert optim.warmup_steps(dataclasses.replace(cfg, warmup_steps=3), num_steps=95) == 3
    with pytest.raises(ValueError, match="warmup_ratio"):
        optim.OptimizerConfig(warmup_ratio=1.0)


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_rmsprop_matches_torch(momentum):
    """RMSprop's default decay and update are torch.optim.RMSprop's (alpha 0.99, eps outside
    the square root): the optimizer of the SAMI paper's Mixtral run."""
    import torch
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) * 10 ** rng.uniform(-3, 1)
             for _ in range(6)]
    lr = 1e-2
    tp = torch.nn.Parameter(torch.tensor(p0))
    topt = torch.optim.RMSprop([tp], lr=lr, momentum=momentum or 0.0)
    cfg = optim.OptimizerConfig(name="rmsprop", learning_rate=lr, schedule="constant",
                                clip_norm=None, momentum=momentum)
    assert cfg.rms_decay == topt.defaults["alpha"] == 0.99
    assert cfg.eps == topt.defaults["eps"]
    tx, _ = optim.make_optimizer(cfg, num_steps=len(grads))
    p, state = {"w": jax.numpy.asarray(p0)}, None
    state = tx.init(p)
    for g in grads:
        tp.grad = torch.tensor(g)
        topt.step()
        updates, state = tx.update({"w": jax.numpy.asarray(g)}, state, p)
        p = optax.apply_updates(p, updates)
    # float32 arithmetic in both, a handful of steps: a few ulps of the parameter scale.
    np.testing.assert_allclose(np.asarray(p["w"]), tp.detach().numpy(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rate", [-1e-3, 0.0])
def test_nonpositive_learning_rate_is_refused_unless_allowed(params, rate):
    with pytest.raises(ValueError, match=r"learning_rate=.*must be > 0.*allow_nonpositive"):
        optim.OptimizerConfig(learning_rate=rate)
    cfg = optim.OptimizerConfig(learning_rate=rate, allow_nonpositive_learning_rate=True,
                                schedule="constant", clip_norm=None)
    _, params = params
    tx, _ = optim.make_optimizer(cfg, num_steps=10)
    grads = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Allowed, the rate is used as given: a negative one moves along the gradient.
    leaf = jax.tree.leaves(updates)[0]
    assert np.all(np.sign(leaf) == -np.sign(rate)) if rate else np.all(leaf == 0)
