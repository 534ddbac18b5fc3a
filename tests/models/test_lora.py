"""LoRA adapters: zero-B identity, merge == adapter forward, peft parity, sharding invariance."""

import json

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from align_jax import sharding
from align_jax.models import hf, lora, transformer

ALL = ("q", "k", "v", "o", "gate", "up", "down")
FAMILIES = ("llama", "gemma")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"lora_{family}")
        hf_models.save_tiny_hf(family, path)
        out[family] = str(path)
    return out


def _tokens(seed, shape, vocab=97):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def _randomise_b(adapters, seed, std=0.05):
    """Adapters as after training: B no longer zero (A kept)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters.weights)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape, x.dtype) if str(p[-1].key).endswith("_b") else x
           for k, (p, x) in zip(keys, leaves)]
    return adapters.replace(weights=jax.tree.unflatten(treedef, new))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_forward_equals_base(checkpoints, family):
    config, params = hf.load_hf(checkpoints[family])
    adapters = lora.init_lora(config, params, rank=4, alpha=8, targets=ALL,
                              rng=jax.random.key(0))
    tokens = _tokens(0, (2, 9))
    base = transformer.forward(config, params, tokens)
    ours = transformer.forward(config, params, tokens, lora=adapters)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(base))
    # A is random (not zero), so the zero is B's doing.
    a = adapters.weights["layers"]["attn"]["q_a"]
    assert a.shape == (config.num_layers, config.embed_dim, 4) and float(jnp.abs(a).max()) > 0


@pytest.mark.parametrize("family,targets,rslora", [
    ("llama", ALL, False), ("gemma", ("q", "v", "o", "down"), True)])
def test_merged_equals_adapter_forward_and_peft(checkpoints, tmp_path, family, targets, rslora):
    path = checkpoints[family]
    config, params = hf.load_hf(path)
    adapters = _randomise_b(lora.init_lora(config, params, rank=4, alpha=16, targets=targets,
                                           rng=jax.random.key(1), rslora=rslora), seed=2)
    tokens = _tokens(3, (2, 10))
    base = np.asarray(transformer.forward(config, params, tokens))
    adapted = np.asarray(transformer.forward(config, params, tokens, lora=adapters))
    assert np.abs(adapted - base).max() > 1e-2, "the adapters should change the logits"
    wrapped = transformer.forward(config, lora.with_adapters(params, adapters), tokens)
    np.testing.assert_array_equal(np.asarray(wrapped), adapted)

    merged = lora.merge_lora(config, params, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    np.testing.assert_allclose(transformer.forward(config, merged, tokens), adapted,
                               atol=1e-5, rtol=0)

    lora.save_peft(config, adapters, tmp_path / "adapter", base_model_name_or_path=path)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["use_rslora"] == rslora
    base_model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    model = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    np.testing.assert_allclose(adapted, ref, atol=1e-4, rtol=0)


def test_sharded_equals_single_device(checkpoints):
    config, params = hf.load_hf(checkpoints["llama"])
    adapters = _randomise_b(lora.init_lora(config, params, rank=4, alpha=8, targets=ALL,
                                           rng=jax.random.key(4)), seed=5)
    tokens = _tokens(6, (8, 7))
    single = np.asarray(transformer.forward(config, params, tokens, lora=adapters))

    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=4, tensor=1))
    p_shard = sharding.tree_shardings(transformer.abstract_params(config), mesh, "fsdp")
    a_shard = sharding.tree_shardings(lora.abstract_lora(config, adapters.spec), mesh, "fsdp")
    params_s = jax.device_put(params, p_shard)
    weights_s = jax.device_put(adapters.weights, a_shard)
    # A's embed axis is split over fsdp, the rank axis is whole.
    q_a = weights_s["layers"]["attn"]["q_a"]
    assert q_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert weights_s["layers"]["mlp"]["down_b"].sharding.spec == jax.sharding.PartitionSpec(
        None, None, "fsdp")

    def fn(p, w, t):
        with sharding.use_mesh(mesh, "fsdp"):
            return transformer.forward(config, p, t, lora=adapters.replace(weights=w))

    out = jax.jit(fn, in_shardings=(p_shard, a_shard, sharding.batch_sharding(mesh, "fsdp")))(
        params_s, weights_s, tokens)
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)


def test_dropout_only_with_a_key(checkpoints):
    config, params = hf.load_hf(checkpoints["llama"])
    adapters = _randomise_b(lora.init_lora(config, params, rank=4, alpha=8, targets=("q", "v"),
                                           rng=jax.random.key(7), dropout=0.5), seed=8)
    tokens = _tokens(9, (2, 6))
    plain = transformer.forward(config, params, tokens, lora=adapters)
    keyed = transformer.forward(
        config, lora.with_adapters(params, adapters, dropout_rng=jax.random.key(0)), tokens)
    again = transformer.forward(
        config, lora.with_adapters(params, adapters, dropout_rng=jax.random.key(0)), tokens)
    np.testing.assert_array_equal(np.asarray(keyed), np.asarray(again))
    assert np.abs(np.asarray(keyed) - np.asarray(plain)).max() > 1e-4


def test_bad_targets_and_fields():
    with pytest.raises(ValueError, match="targets"):
        lora.LoraConfig(targets=("q", "query"))
    with pytest.raises(ValueError, match="unknown field"):
        lora.lora_config({"rank": 4, "alhpa": 8})
    assert lora.lora_config({"rank": 4, "targets": ["q"]}).targets == ("q",)


# The new families: fused q/k/v modules (GPT-2 c_attn, GPT-NeoX query_key_value) and Mixtral's
# experts (peft target_parameters on the stacked gate_up_proj / down_proj) export
# block-diagonally; a subset of a fused module's targets leaves the other rows at zero.
DENSE_PLAIN = ("q", "k", "v", "o", "up", "down")


@pytest.mark.parametrize("family,targets,rslora", [
    ("mixtral", ALL, False), ("mixtral", ("q", "up"), True),
    ("mixtral", ("gate", "up", "down"), False),
    ("gpt2", DENSE_PLAIN, False), ("gpt2", ("q", "v", "down"), True),
    ("gpt_neox", DENSE_PLAIN, False), ("gpt_neox", ("k", "o"), False),
    ("phi", DENSE_PLAIN, True)])
def test_new_families_merge_and_peft(tmp_path, family, targets, rslora):
    path = str(tmp_path / "base")
    hf_models.save_tiny_hf(family, path)
    config, params = hf.load_hf(path)
    adapters = _randomise_b(lora.init_lora(config, params, rank=4, alpha=16, targets=targets,
                                           rng=jax.random.key(1), rslora=rslora), seed=2)
    tokens = _tokens(3, (2, 10))
    base = np.asarray(transformer.forward(config, params, tokens))
    adapted = np.asarray(transformer.forward(config, params, tokens, lora=adapters))
    assert np.abs(adapted - base).max() > 1e-2, "the adapters should change the logits"
    merged = lora.merge_lora(config, params, adapters)
    np.testing.assert_allclose(transformer.forward(config, merged, tokens), adapted,
                               atol=1e-5, rtol=0)

    lora.save_peft(config, adapters, tmp_path / "adapter", base_model_name_or_path=path)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    model = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    # float32 sums in another order (fused modules, per-expert matmuls): 1e-4 as above.
    np.testing.assert_allclose(adapted, ref, atol=1e-4, rtol=0)


def test_plain_mlp_has_no_gate_target(tmp_path):
    hf_models.save_tiny_hf("gpt2", tmp_path)
    config, params = hf.load_hf(str(tmp_path))
    with pytest.raises(ValueError, match="no layers/mlp/gate for target 'gate'"):
        lora.init_lora(config, params, rank=2, alpha=4, targets=("gate",),
                       rng=jax.random.key(0))


def test_peft_module_names_are_aliases_of_ours():
    assert lora.LoraConfig(targets=("q_proj", "v_proj")).targets == ("q", "v")
    assert lora.LoraConfig(targets="all-linear").targets == ALL
    assert lora.lora_config({"targets": ["all-linear", "q"]}).targets == ALL
    assert lora.lora_config({"targets": "down_proj"}).targets == ("down",)
    with pytest.raises(ValueError, match="peft's names"):
        lora.LoraConfig(targets=("qkv_proj",))


@pytest.mark.parametrize("targets", [ALL, ("q", "v")])
def test_load_peft_inverts_save_peft(checkpoints, tmp_path, targets):
    config, params = hf.load_hf(checkpoints["llama"])
    adapters = _randomise_b(lora.init_lora(config, params, rank=4, alpha=8, targets=targets,
                                           rng=jax.random.key(7), rslora=True), seed=8)
    lora.save_peft(config, adapters, tmp_path / "a")
    back = lora.load_peft(config, tmp_path / "a")
    assert back.spec == adapters.spec
    for x, y in zip(jax.tree.leaves(back.weights), jax.tree.leaves(adapters.weights)):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_load_peft_reads_an_adapter_peft_made(checkpoints, tmp_path):
    path = checkpoints["llama"]
    base_model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    torch.manual_seed(0)
    model = peft.get_peft_model(base_model, peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "o_proj", "up_proj"], lora_dropout=0.0))
    with torch.no_grad():  # as after training: B no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(str(tmp_path / "peft"))
    tokens = _tokens(9, (2, 10))
    with torch.no_grad():
        ref = model.eval()(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    config, params = hf.load_hf(path)
    adapters = lora.load_peft(config, tmp_path / "peft")
    assert adapters.spec.targets == ("q", "o", "up") and adapters.spec.scale == 3.0
    ours = np.asarray(transformer.forward(config, params, tokens, lora=adapters))
    base = np.asarray(transformer.forward(config, params, tokens))
    assert np.abs(ours - base).max() > 1e-2
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)  # as the peft parity test above


def test_load_peft_errors_name_the_file(checkpoints, tmp_path):
    config, params = hf.load_hf(checkpoints["llama"])
    adapters = lora.init_lora(config, params, rank=4, alpha=8, targets=("q",),
                              rng=jax.random.key(0))
    lora.save_peft(config, adapters, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(ValueError, match="adapter_config.json: field 'rank_pattern'"):
        lora.load_peft(config, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_peft(config, tmp_path / "missing")
