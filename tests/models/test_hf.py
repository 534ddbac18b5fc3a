"""Hugging Face checkpoints in and out: logits parity with transformers (torch, float32)."""

import dataclasses
import json
import os
import re

import flax.linen as nn
import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from align_jax import sharding
from align_jax.models import hf, transformer
from align_jax.models.config import PRESETS, RopeScaling

ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, the torch model saved there)."""
    out = {}
    for family in hf_models.FAMILIES:
        path = tmp_path_factory.mktemp(family)
        out[family] = (str(path), hf_models.save_tiny_hf(family, path))
    return out


def _tokens(seed, shape, vocab=97):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int64)


def _torch_logits(model, tokens, mask=None, positions=None):
    kw = {}
    if mask is not None:
        kw = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    with torch.no_grad():
        return model(torch.tensor(tokens), **kw).logits.float().numpy()


def _left_padded(seed, lengths, t):
    tokens = _tokens(seed, (len(lengths), t))
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        mask[row, t - n:] = 1
    tokens = np.where(mask == 1, tokens, 0)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return tokens, mask, positions


def _load_torch(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


# ------------------------------------------------------------------------- load parity


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_forward_matches_transformers(checkpoints, family):
    path, model = checkpoints[family]
    config, params = hf.load_hf(path)
    # 12 tokens: longer than Mistral's window of 5, so the window is exercised.
    tokens = _tokens(1, (2, 12))
    ours = np.asarray(transformer.forward(config, params, tokens))
    ref = _torch_logits(model, tokens)
    assert ours.dtype == np.float32 and ours.shape == (2, 12, 97)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    assert np.abs(ref).max() > 0.1, "logits too small for the tolerance to mean anything"


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_left_padded_forward_matches_transformers(checkpoints, family):
    path, model = checkpoints[family]
    config, params = hf.load_hf(path)
    tokens, mask, positions = _left_padded(2, [12, 7, 3], 12)
    ref = _torch_logits(model, tokens, mask, positions)
    ours = np.asarray(transformer.forward(config, params, tokens, positions_BT=positions,
                                          segment_ids_BT=mask))
    real = mask == 1
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


def test_config_fields_of_each_family(checkpoints):
    configs = {f: hf.load_hf(checkpoints[f][0])[0] for f in hf_models.FAMILIES}
    assert configs["llama"].rope_scaling == RopeScaling(
        kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position=64)
    assert not configs["llama"].tie_embeddings
    assert configs["mistral"].sliding_window == 5 and configs["mistral"].head_dim == 8
    assert configs["qwen2"].sliding_window is None
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].out_bias
    assert configs["qwen2"].rope_theta == 1e6 and configs["qwen2"].tie_embeddings
    gemma = configs["gemma"]
    assert (gemma.activation, gemma.norm_offset, gemma.scale_embeddings,
            gemma.tie_embeddings, gemma.head_dim, gemma.num_kv_heads) == (
        "gelu_tanh", 1.0, True, True, 16, 1)
    assert (gemma.bos_token_id, gemma.eos_token_id, gemma.pad_token_id) == (2, 1, 0)


def test_linear_rope_scaling_llama(tmp_path):
    model = hf_models.save_tiny_hf(
        "llama", tmp_path, rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                            "factor": 4.0})
    config, params = hf.load_hf(tmp_path)
    assert config.rope_scaling == RopeScaling(kind="linear", factor=4.0)
    assert config.rope_theta == 500.0
    tokens = _tokens(3, (2, 10))
    np.testing.assert_allclose(transformer.forward(config, params, tokens),
                               _torch_logits(model, tokens), atol=ATOL, rtol=0)


def test_bfloat16_load_and_save(checkpoints, tmp_path):
    path, model = checkpoints["llama"]
    config, params = hf.load_hf(path, dtype=jnp.bfloat16)
    assert config.dtype == config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    tokens = _tokens(4, (1, 8))
    ours = np.asarray(transformer.forward(config, params, tokens))
    np.testing.assert_allclose(ours, _torch_logits(model, tokens), atol=0.1, rtol=0)
    hf.save_hf(config, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == jnp.bfloat16
    config2, params2 = hf.load_hf(tmp_path, dtype=jnp.bfloat16)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_load_onto_a_mesh_and_save_from_it(checkpoints, tmp_path):
    path, model = checkpoints["qwen2"]
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    config, params = hf.load_hf(path, mesh=mesh, rules="fsdp_tp")
    q_proj = params["layers"]["attn"]["q_proj"]  # [L, D, N, H]: D on fsdp, N on tensor
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q_proj.addressable_shards[0].data.shape == (2, 16, 2, 8)
    _, plain = hf.load_hf(path)
    jax.tree.map(np.testing.assert_array_equal, params, plain)
    hf.save_hf(config, params, tmp_path)  # gathers each sharded tensor
    jax.tree.map(np.testing.assert_array_equal, hf.load_hf(tmp_path)[1], plain)


def test_loads_shards_written_by_transformers(tmp_path):
    model = hf_models.tiny_hf_model("qwen2")
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    config, params = hf.load_hf(tmp_path)
    tokens = _tokens(5, (2, 9))
    np.testing.assert_allclose(transformer.forward(config, params, tokens),
                               _torch_logits(model, tokens), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_save_round_trip_through_transformers(checkpoints, tmp_path, family):
    path, model = checkpoints[family]
    config, params = hf.load_hf(path)
    hf.save_hf(config, params, tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    assert not os.path.exists(tmp_path / "model.safetensors.index.json")
    reloaded = _load_torch(str(tmp_path))
    tokens = _tokens(6, (2, 11))
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), _torch_logits(model, tokens),
                               atol=1e-5, rtol=0)
    written = json.loads((tmp_path / "config.json").read_text())
    if config.positions == "rope":
        assert written["rope_theta"] == config.rope_theta
        assert written["rope_parameters"]["rope_type"] == (
            config.rope_scaling.kind if config.rope_scaling else "default")
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    if config.eos_token_id is not None:
        assert generation["eos_token_id"] == config.eos_token_id
    config2, params2 = hf.load_hf(tmp_path)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_edited_params_export(checkpoints, tmp_path):
    path, model = checkpoints["llama"]
    config, params = hf.load_hf(path)
    down = params["layers"]["mlp"]["down"]
    edited = jax.tree.map(lambda x: x, params)
    edited["layers"]["mlp"]["down"] = down.at[1].multiply(0.5)
    hf.save_hf(config, edited, tmp_path)
    tokens = _tokens(7, (2, 10))
    exported = _torch_logits(_load_torch(str(tmp_path)), tokens)
    np.testing.assert_allclose(exported, transformer.forward(config, edited, tokens),
                               atol=ATOL, rtol=0)
    assert np.abs(exported - _torch_logits(model, tokens)).max() > 1e-2


def test_sharded_save(checkpoints, tmp_path):
    path, model = checkpoints["gemma"]
    config, params = hf.load_hf(path)
    # An earlier single-file save in the same directory must not survive next to the shards.
    hf.save_hf(config, params, tmp_path)
    hf.save_hf(config, params, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards
    for name in shards:
        assert os.path.getsize(tmp_path / name) < 20_000 + 4096  # + safetensors header
    assert "model.embed_tokens.weight" in index["weight_map"]
    tokens = _tokens(8, (2, 9))
    np.testing.assert_allclose(_torch_logits(_load_torch(str(tmp_path)), tokens),
                               _torch_logits(model, tokens), atol=1e-5, rtol=0)
    config2, params2 = hf.load_hf(tmp_path)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_save_rejects_what_transformers_cannot_express():
    with pytest.raises(ValueError, match="sliding_window"):
        hf.config_to_hf(dataclasses.replace(PRESETS["tiny"], sliding_window=4))
    with pytest.raises(ValueError, match="norm_offset"):
        hf.config_to_hf(dataclasses.replace(PRESETS["tiny"], norm_offset=1.0))


def test_save_rejects_wrong_param_shape(tmp_path):
    config = PRESETS["tiny"]
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                          nn.unbox(transformer.abstract_params(config)))
    params["final_norm"]["scale"] = np.ones((3,), np.float32)
    with pytest.raises(ValueError, match=r"final_norm/scale has shape \(3,\), expected \(64,\)"):
        hf.save_hf(config, params, tmp_path)


# ------------------------------------------------------------------------- config mapping


def test_legacy_and_transformers5_keys_agree():
    common = dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=3,
                  eos_token_id=[7, 9])
    legacy = dict(common, rope_theta=777.0, torch_dtype="bfloat16",
                  rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32})
    new = dict(common, dtype="bfloat16", rope_parameters={
        "rope_type": "llama3", "rope_theta": 777.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    a, b = hf.config_from_hf(legacy), hf.config_from_hf(new)
    assert a == b
    assert a.rope_theta == 777.0 and a.rope_scaling.original_max_position == 32
    assert a.eos_token_id == (7, 9) and a.head_dim == 4
    # transformers' own parse of the legacy keys gives the same config.
    parsed = transformers.LlamaConfig(**{k: v for k, v in legacy.items() if k != "model_type"})
    assert hf.config_from_hf(parsed.to_dict()) == a


def test_window_and_activation_keys():
    base = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4)
    qwen = hf.config_from_hf(dict(base, model_type="qwen2", use_sliding_window=False,
                                  sliding_window=4096))
    assert qwen.sliding_window is None and qwen.num_kv_heads == 4
    qwen_sw = hf.config_from_hf(dict(base, model_type="qwen2", use_sliding_window=True,
                                     sliding_window=64, max_window_layers=0))
    assert qwen_sw.sliding_window == 64
    with pytest.raises(ValueError, match="mixes sliding and full"):
        hf.config_from_hf(dict(base, model_type="qwen2", use_sliding_window=True,
                               sliding_window=64, max_window_layers=1))
    assert hf.config_from_hf(dict(base, model_type="mistral",
                                  sliding_window=None)).sliding_window is None
    gemma = hf.config_from_hf(dict(base, model_type="gemma", hidden_act="gelu",
                                   hidden_activation=None))
    assert gemma.activation == "gelu_tanh" and gemma.tie_embeddings
    assert hf.config_from_hf(dict(base, model_type="gemma",
                                  hidden_activation="gelu_pytorch_tanh")).activation == "gelu_tanh"


# ------------------------------------------------------------------------- bad inputs


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + r".*config\.json"):
        hf.load_hf(tmp_path)


def test_bin_only_checkpoint_is_refused(checkpoints, tmp_path):
    _copy_checkpoint(checkpoints["llama"][0], tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*not read"):
        hf.load_hf(tmp_path)


def _copy_checkpoint(src, dst):
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(dst, name), "wb") as b:
            b.write(a.read())


def test_wrong_tensor_shape(checkpoints, tmp_path):
    _copy_checkpoint(checkpoints["mistral"][0], tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.1.self_attn.k_proj.weight"
    tensors[key] = tensors[key][:8]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{key}.*\(8, 32\), "
                                         r"expected \(16, 32\)"):
        hf.load_hf(tmp_path)


def test_missing_and_unexpected_tensors(checkpoints, tmp_path):
    _copy_checkpoint(checkpoints["llama"][0], tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    head = tensors.pop("lm_head.weight")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors.*'lm_head\.weight'.*tie_word"):
        hf.load_hf(tmp_path)
    tensors["lm_head.weight"] = head
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    tensors["model.layers.0.mlp.extra.weight"] = np.ones(4, np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra"):
        hf.load_hf(tmp_path)


def _with_config(checkpoints, tmp_path, edit):
    _copy_checkpoint(checkpoints["llama"][0], tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_rope_type(checkpoints, tmp_path):
    _with_config(checkpoints, tmp_path,
                 lambda c: c["rope_parameters"].update(rope_type="yarn"))
    with pytest.raises(ValueError, match=r"config\.json.*rope_parameters\.rope_type='yarn'"):
        hf.load_hf(tmp_path)
    with pytest.raises(ValueError, match=r"my\.json: rope_scaling\.rope_type='dynamic'"):
        hf.config_from_hf(dict(model_type="llama", vocab_size=5, hidden_size=8,
                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                               rope_scaling={"type": "dynamic", "factor": 2.0}),
                          source="my.json")


def test_unknown_model_type(checkpoints, tmp_path):
    _with_config(checkpoints, tmp_path, lambda c: c.update(model_type="falcon"))
    with pytest.raises(ValueError, match=r"config\.json: model_type='falcon'"):
        hf.load_hf(tmp_path)
