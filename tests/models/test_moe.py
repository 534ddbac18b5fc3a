"""The mixture-of-experts MLP: routing and capacity against numpy, the router's auxiliary loss
against transformers, no full-size dense tensor, expert-sharded equal to one device."""

import dataclasses

import flax.linen as nn
import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from align_jax import sharding
from align_jax.losses import objectives
from align_jax.models import hf, moe, transformer
from align_jax.models.config import get_config
from align_jax.train import step as step_lib

# E = 8, k = 2: at capacity_factor 2 a row's experts have T / 2 slots each, so the expert
# buffer is half the dense [T, E, D]; 0.5 makes drops certain.
CFG = get_config("tiny", family="mixtral", vocab_size=101, num_experts=8, experts_per_token=2,
                 tie_embeddings=False, router_aux_loss_coef=0.02, init_std=0.2)


def _np_moe(x, seg, p, cfg):
    """Independent reference: loops over rows, choices and tokens in the documented order."""
    b, t, _ = x.shape
    e, k = cfg.num_experts, cfg.experts_per_token
    c = max(1, min(t, int(np.ceil(cfg.capacity_factor * t * k / e))))
    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    w = np.take_along_axis(probs, top, -1)
    w /= w.sum(-1, keepdims=True)
    out, dropped = np.zeros_like(x), 0
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    for row in range(b):
        used = np.zeros(e, int)
        for j in range(k):
            for tok in range(t):
                if seg[row, tok] == 0:
                    continue
                ex = top[row, tok, j]
                if used[ex] == c:
                    dropped += 1
                    continue
                used[ex] += 1
                xi = x[row, tok]
                h = silu(xi @ p["gate"][ex]) * (xi @ p["up"][ex])
                out[row, tok] += w[row, tok, j] * (h @ p["down"][ex])
    return out, dropped


@pytest.mark.parametrize("capacity_factor", [2.0, 0.5])
def test_dispatch_matches_numpy(capacity_factor):
    cfg = dataclasses.replace(CFG, capacity_factor=capacity_factor)
    rng = np.random.RandomState(0)
    x = rng.randn(3, 16, cfg.embed_dim).astype(np.float32)
    seg = np.ones((3, 16), np.int32)
    seg[1, :5] = 0  # left padding takes no slots
    seg[2, 12:] = 0
    layer = moe.MoE(cfg)
    params = nn.unbox(layer.init(jax.random.key(1), x, seg))["params"]
    y, stats = layer.apply({"params": params}, x, seg)
    want, dropped = _np_moe(x, seg, jax.tree.map(np.asarray, params), cfg)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(y)[real], want[real], atol=1e-5, rtol=1e-5)
    assert float(stats["dropped"]) == dropped
    assert float(stats["tokens"]) == real.sum()
    assert float(stats["expert_counts"].sum()) == 2 * real.sum()
    if capacity_factor < 1:
        assert dropped > 0, "the small capacity must drop assignments"
    else:
        assert dropped == 0


def test_decode_never_drops():
    # One token a row: each expert is picked at most once, and C = 1.
    cfg = dataclasses.replace(CFG, capacity_factor=0.01)
    assert moe.capacity(cfg, 1) == 1
    x = np.random.RandomState(1).randn(5, 1, cfg.embed_dim).astype(np.float32)
    layer = moe.MoE(cfg)
    params = layer.init(jax.random.key(2), x, np.ones((5, 1), np.int32))["params"]
    _, stats = layer.apply({"params": params}, x, np.ones((5, 1), np.int32))
    assert float(stats["dropped"]) == 0
    assert moe.capacity(CFG, 16) == 8 and moe.capacity(dataclasses.replace(
        CFG, capacity_factor=100.0), 16) == 16


def _max_intermediate(jaxpr) -> int:
    """The most elements of any value a jaxpr (and its sub-jaxprs) computes."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _max_intermediate(inner))
    return best


def test_no_full_size_dense_tensor_forward_or_backward():
    # Rows enough that the weights (E x D x F) are smaller than the bound below.
    b, t, d, e = 8, 32, CFG.embed_dim, CFG.num_experts
    x = jnp.ones((b, t, d))
    seg = jnp.ones((b, t), jnp.int32)
    layer = moe.MoE(CFG)
    params = layer.init(jax.random.key(0), x, seg)["params"]

    def loss(p, x):
        return jnp.sum(layer.apply({"params": p}, x, seg)[0] ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr
    biggest = _max_intermediate(jaxpr)
    # The expert buffers are [B, E, C, F] with C = T / 2: half the dense [B, T, E, F].
    assert biggest <= b * t * e * CFG.mlp_dim // 2, biggest


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    model = hf_models.save_tiny_hf("mixtral", path)
    config, params = hf.load_hf(str(path))
    return model, config, params


def test_aux_loss_matches_transformers(mixtral):
    model, config, params = mixtral
    assert config.router_aux_loss_coef == 0.02 and config.num_experts == 4
    tokens = np.random.RandomState(3).randint(0, 97, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :4] = 0
    mask[2, :9] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions), output_router_logits=True)
    logits, aux = transformer.forward_with_aux(config, params, tokens, positions_BT=positions,
                                               segment_ids_BT=mask)
    # float32 sums over ~70 tokens x 2 layers in another order.
    np.testing.assert_allclose(float(aux["router_aux_loss"]), float(out.aux_loss), rtol=1e-5)
    assert float(aux["moe_dropped_fraction"]) == 0.0
    real = mask == 1
    np.testing.assert_allclose(np.asarray(logits)[real], out.logits.numpy()[real], atol=2e-4)


def test_step_adds_the_weighted_aux_loss(mixtral):
    _, config, params = mixtral
    tokens = np.random.RandomState(4).randint(0, 97, (2, 11)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((2, 10), np.float32),
             "segment_ids": np.ones((2, 10), np.int32)}

    @jax.jit
    def run(params, batch):
        out = {}
        for coef in (0.02, 0.0):
            cfg = dataclasses.replace(config, router_aux_loss_coef=coef)
            loss = objectives.get_objective("sft").bind(config=cfg)
            out[coef] = step_lib.accumulate_gradients(loss, params, batch, rng=jax.random.key(0))
        plain, _ = loss(params, batch, rng=None, ref_params=None)
        _, aux = transformer.forward_with_aux(config, params, batch["tokens"],
                                              segment_ids_BT=batch["segment_ids"])
        return out, plain, aux

    out, plain, aux = run(params, batch)
    value, metrics, grads = out[0.02]
    np.testing.assert_allclose(float(metrics["router_aux_loss"]), float(aux["router_aux_loss"]),
                               rtol=1e-6)
    np.testing.assert_allclose(float(value), float(plain) + 0.02 * float(aux["router_aux_loss"]),
                               rtol=1e-6)
    np.testing.assert_allclose(float(out[0.0][0]), float(plain), rtol=1e-6)
    # The router learns from the aux loss too: without it its gradient differs.
    router = grads["layers"]["mlp"]["router"] - out[0.0][2]["layers"]["mlp"]["router"]
    assert float(jnp.abs(router).max()) > 1e-6


def test_reference_forward_adds_no_aux_loss(mixtral):
    _, config, params = mixtral
    tokens = np.random.RandomState(5).randint(0, 97, (2, 9)).astype(np.int32)
    ref = jax.tree.map(lambda x: x + 0.0, params)  # the same values, other arrays

    def loss(p, batch, *, rng, ref_params):
        del rng
        main = transformer.forward(config, p, batch["tokens"])
        frozen = transformer.forward(config, jax.lax.stop_gradient(ref_params), batch["tokens"])
        return jnp.mean(main - frozen), {}

    value, metrics, _ = jax.jit(lambda p, r: step_lib.accumulate_gradients(
        loss, p, {"tokens": tokens}, rng=jax.random.key(0), ref_params=r))(params, ref)
    _, aux = jax.jit(lambda p: transformer.forward_with_aux(config, p, tokens))(params)
    # One aux term (the trained forward's), not two.
    np.testing.assert_allclose(float(value), 0.02 * float(aux["router_aux_loss"]), rtol=1e-5,
                               atol=1e-7)
    assert set(metrics) == {"router_aux_loss", "moe_dropped_fraction"}


@pytest.mark.parametrize("capacity_factor", [pytest.param(2.0, marks=pytest.mark.slow), 0.5])
def test_expert_sharded_equals_single_device(capacity_factor):
    cfg = dataclasses.replace(CFG, capacity_factor=capacity_factor, num_experts=4)
    params = transformer.init_params(cfg, jax.random.key(0))
    tokens = np.random.RandomState(6).randint(0, cfg.vocab_size, (8, 12))
    seg = np.ones_like(tokens)
    seg[3, :5] = 0

    def loss(p, t, s):
        logits, aux = transformer.forward_with_aux(cfg, p, t, segment_ids_BT=s)
        return jnp.mean(logits ** 2) + aux["router_aux_loss"], aux

    single = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, tokens, seg)
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=4, tensor=1))
    shards = sharding.tree_shardings(transformer.abstract_params(cfg), mesh, "fsdp")
    placed = jax.device_put(params, shards)
    # Experts at rest: 4 experts over fsdp = 4, one per device along it.
    assert placed["layers"]["mlp"]["gate"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", None, None)

    def fn(p, t, s):
        with sharding.use_mesh(mesh, "fsdp"):
            return jax.value_and_grad(loss, has_aux=True)(p, t, s)

    batch = sharding.batch_sharding(mesh, "fsdp")
    jitted = jax.jit(fn, in_shardings=(shards, batch, batch))
    # The tokens travel to their experts' devices and back: all-to-all, not a weight gather.
    assert "all-to-all" in jitted.lower(placed, tokens, seg).compile().as_text()
    (value, aux), grads = jitted(placed, tokens, seg)
    (value1, aux1), grads1 = single
    # float32 reductions split across devices: a few ulps of the sums.
    np.testing.assert_allclose(float(value), float(value1), rtol=1e-5)
    np.testing.assert_allclose(float(aux["moe_dropped_fraction"]),
                               float(aux1["moe_dropped_fraction"]), rtol=0)
    if capacity_factor < 1:
        assert float(aux1["moe_dropped_fraction"]) > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=str(path))
