"""The families beyond Llama: invariants on random tiny configs (cached decode equals the full
forward, a train step on 8 fake devices equals one device), variants the parity fixtures do
not cover, and the family table's errors."""

import dataclasses

import hf_models
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from align_jax import sharding
from align_jax.losses import objectives
from align_jax.models import hf, lora, transformer
from align_jax.models.config import ModelConfig, get_config
from align_jax.train import compile as compile_lib
from align_jax.train import optim
from align_jax.train import state as state_lib

_TINY = dict(vocab_size=101, init_std=0.1, tie_embeddings=False)
CONFIGS = {
    "mixtral": get_config("tiny", family="mixtral", num_experts=4, experts_per_token=2,
                          router_aux_loss_coef=0.02, **_TINY),
    "gpt2": get_config("tiny", family="gpt2", norm="layer", positions="learned",
                       num_kv_heads=4, gated_mlp=False, activation="gelu_tanh", qkv_bias=True,
                       out_bias=True, mlp_bias=True, max_position=64,
                       **{**_TINY, "tie_embeddings": True}),
    "gpt_neox": get_config("tiny", family="gpt_neox", norm="layer", num_kv_heads=4,
                           gated_mlp=False, activation="gelu", rope_fraction=0.25,
                           residual="parallel", qkv_bias=True, out_bias=True, mlp_bias=True,
                           **_TINY),
    "phi": get_config("tiny", family="phi", norm="layer", gated_mlp=False,
                      activation="gelu_tanh", rope_fraction=0.5,
                      residual="parallel_shared_norm", qkv_bias=True, out_bias=True,
                      mlp_bias=True, head_bias=True, **_TINY),
}


def _random_params(cfg, seed=0):
    """Random params with norms and biases moved off their init, so none is a no-op."""
    params = transformer.init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = [x + 0.1 * jax.random.normal(k, x.shape) if any(
        str(getattr(p, "key", "")) in ("scale", "bias", "lm_head_bias") or
        str(getattr(p, "key", "")).endswith("_bias") for p in path) else x
        for k, (path, x) in zip(keys, leaves)]
    return jax.tree.unflatten(tree, out)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_config_exports_and_reads_back(family):
    cfg = CONFIGS[family]
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cached_decode_equals_full_forward(family):
    cfg = CONFIGS[family]
    params = _random_params(cfg)
    t = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 10))
    seg = np.ones_like(t)
    seg[0, :3] = 0  # left padding
    pos = np.asarray(transformer.positions_from_segments(seg))
    full = np.asarray(jax.jit(lambda p: transformer.forward(
        cfg, p, t, positions_BT=pos, segment_ids_BT=seg))(params))
    cached = jax.jit(lambda p, t, c, pos, seg: transformer.forward_with_cache(
        cfg, p, t, cache=c, positions_BT=pos, segment_ids_BT=seg))
    cache = transformer.init_cache(cfg, 2, 16)
    # Unwritten slots hold NaN: cached attention reads only the filled ones.
    cache = {**cache, "k": np.full(cache["k"].shape, np.nan, np.float32),
             "v": np.full(cache["v"].shape, np.nan, np.float32)}
    logits, cache = cached(params, t[:, :6], cache, pos[:, :6], seg[:, :6])
    np.testing.assert_allclose(logits[0, 3:], full[0, 3:6], atol=1e-5)
    np.testing.assert_allclose(logits[1], full[1, :6], atol=1e-5)
    for i in range(6, 10):
        step, cache = cached(params, t[:, i:i + 1], cache, pos[:, i:i + 1], seg[:, i:i + 1])
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5)


def _batch(cfg):
    rng = np.random.RandomState(2)
    tokens = rng.randint(0, cfg.vocab_size, (8, 13)).astype(np.int32)
    seg = np.ones((8, 12), np.int32)
    seg[:, 7:] = 2
    seg[:, 10:] = 0
    mask = (seg > 0).astype(np.float32)
    mask[:, 6] = 0.0
    pos = np.asarray(transformer.positions_from_segments(seg))
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "segment_ids": seg, "positions": pos}


def _one_step(cfg, mesh, rules, params):
    tx, schedule = optim.make_optimizer(
        optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, eps=1e-4), num_steps=10)
    abstract = state_lib.abstract_state(transformer.abstract_params(cfg), tx=tx)
    shardings = state_lib.train_state_shardings(abstract, mesh, rules)
    state = compile_lib.init_train_state(jax.device_put(params, shardings.params), tx=tx,
                                         seed=0, state_shardings=shardings)
    step = compile_lib.jit_train_step(
        loss=objectives.get_objective("sft").bind(config=cfg), tx=tx, schedule=schedule,
        grad_accum=1, mesh=mesh, rules=rules, state_shardings=shardings)
    state, metrics = step(state, jax.device_put(_batch(cfg),
                                                compile_lib.batch_shardings(mesh, rules)))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_train_step_on_8_devices_equals_one(family):
    cfg = CONFIGS[family]
    params = jax.device_get(_random_params(cfg, seed=3))
    one = sharding.make_mesh(sharding.MeshSpec(data=1), devices=jax.devices()[:1])
    ref_params, ref_metrics = _one_step(cfg, one, "dp", params)
    # fsdp_tp: embed over fsdp, heads/mlp/vocab over tensor, experts over (fsdp, data).
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    got_params, metrics = _one_step(cfg, mesh, "fsdp_tp", params)
    # float32 sums split over devices (and Adam's first step ~ lr * sign(g), eps=1e-4).
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_params),
                            jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5, err_msg=str(path))
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
    if cfg.num_experts:
        np.testing.assert_allclose(metrics["router_aux_loss"], ref_metrics["router_aux_loss"],
                                   rtol=1e-5)
    else:
        assert "router_aux_loss" not in metrics


def test_redpajama_style_sequential_neox_matches_transformers(tmp_path):
    # RedPajama-INCITE: GPT-NeoX with use_parallel_residual=false and full rotary.
    model = hf_models.save_tiny_hf("gpt_neox", tmp_path, use_parallel_residual=False,
                                   rotary_pct=1.0)
    config, params = hf.load_hf(str(tmp_path))
    assert config.residual == "sequential" and config.rope_fraction == 1.0
    tokens = np.random.RandomState(4).randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(transformer.forward(config, params, tokens), ref, atol=2e-4)


def test_gpt2_checkpoint_saved_from_the_bare_model_loads(tmp_path):
    # openai-community/gpt2 names its tensors "h.0.attn..." (saved from GPT2Model) and keeps
    # the causal-mask buffers "h.0.attn.bias".
    hf_models.save_tiny_hf("gpt2", tmp_path)
    _, params = hf.load_hf(str(tmp_path))
    file = tmp_path / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 256, 256), np.float32))
    save_file(tensors, file, metadata={"format": "pt"})
    _, bare = hf.load_hf(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, bare, params)


def test_unknown_family_is_an_error_on_export(tmp_path):
    cfg = dataclasses.replace(get_config("tiny"), family="falcon")
    params = transformer.init_params(get_config("tiny"), jax.random.key(0))
    with pytest.raises(ValueError, match=r"ModelConfig\.family='falcon'.*supported"):
        hf.save_hf(cfg, params, tmp_path)
    adapters = lora.init_lora(get_config("tiny"), params, rank=2, alpha=4, targets=("q",),
                              rng=jax.random.key(1))
    with pytest.raises(ValueError, match="model_type='falcon' is not supported"):
        lora.save_peft(cfg, adapters, tmp_path / "adapter")
    assert not list(tmp_path.iterdir())


def test_family_fields_are_checked_on_export():
    with pytest.raises(ValueError, match=r"head_bias=False.*phi models have head_bias=True"):
        hf.config_to_hf(dataclasses.replace(CONFIGS["phi"], head_bias=False))
    with pytest.raises(ValueError, match=r"num_kv_heads.*no grouped-query attention"):
        hf.config_to_hf(dataclasses.replace(CONFIGS["gpt2"], num_kv_heads=2))
    with pytest.raises(ValueError, match="num_experts=0.*mixtral models have|Mixtral is a"):
        hf.config_to_hf(dataclasses.replace(CONFIGS["mixtral"], num_experts=0))
    with pytest.raises(ValueError, match="experts_per_token"):
        ModelConfig(family="mixtral", vocab_size=8, embed_dim=8, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=8, mlp_dim=8, num_experts=2, experts_per_token=3)
    with pytest.raises(ValueError, match="rope_fraction"):
        dataclasses.replace(CONFIGS["phi"], rope_fraction=0.1)
