"""GGUF import: tiny GGUF files written here with the `gguf` writer, checked against the torch
model they came from and against transformers' own GGUF loader (the real SmolLM2 file:
test_gguf_smollm2.py)."""

import json
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf_files import TOKENS, VOCAB, Q, tiny_llama, write_tiny_gguf

import align_jax.models.gguf as gguf_import
from align_jax.models import forward, load_hf
from align_jax.models.gguf import gguf_to_hf, load_gguf, read_gguf_config
from align_jax.models.named import resolve_model_path
from align_jax.tokenizer import load_tokenizer


def _tokens(seed, shape):
    return np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int64)


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def test_f32_gguf_matches_the_torch_model_it_came_from(tmp_path):
    # Tied here; the quantized test below covers a separate output.weight.
    tie = True
    model = tiny_llama(tie_word_embeddings=tie)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
    config, params = load_gguf(path)
    assert config.tie_embeddings == tie and config.vocab_size == VOCAB
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert read_gguf_config(path) == config
    tokens = _tokens(0, (2, 11))
    ours = np.asarray(forward(config, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, _logits(model, tokens), atol=1e-4, rtol=0)


# Every supported simple type at once; Q4_K and Q6_K need rows of 256 (too wide here).
QUANT_MIX = {"token_embd.weight": Q.Q8_0, "attn_q.weight": Q.F16, "ffn_up.weight": Q.Q8_0,
             "attn_k.weight": Q.Q4_0, "attn_v.weight": Q.Q4_1, "attn_output.weight": Q.BF16,
             "ffn_down.weight": Q.Q4_1, "output.weight": Q.Q8_0}


def test_quantized_gguf_matches_transformers_gguf_loader(tmp_path):
    model = tiny_llama()
    path = write_tiny_gguf(tmp_path / "q.gguf", model, types=QUANT_MIX)
    config, params = load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="q.gguf", dtype=torch.float32).eval()
    tokens = _tokens(1, (2, 9))
    ours = np.asarray(forward(config, params, jnp.asarray(tokens)))
    theirs = _logits(ref, tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # Quantization did change the weights: the comparison is not against the f32 model.
    assert np.abs(theirs - _logits(model, tokens)).max() > 1e-4


def test_converted_dir_loads_in_transformers_with_tokenizer_and_template(tmp_path):
    model = tiny_llama()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model, types={"ffn_gate.weight": Q.Q8_0})
    out = gguf_to_hf(path, tmp_path / "hf")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == "llama"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    tokens = _tokens(2, (1, 12))
    np.testing.assert_allclose(_logits(reloaded, tokens), _logits(from_gguf, tokens), atol=1e-5)
    config, params = load_hf(out)
    np.testing.assert_allclose(np.asarray(forward(config, params, jnp.asarray(tokens))),
                               _logits(from_gguf, tokens), atol=1e-4)
    # The tokenizer: same ids as transformers' GGUF tokenizer, the template from the metadata.
    tok = load_tokenizer(out)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    text = "the other there, the end"
    assert tok.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert tok.encode(" the") == [TOKENS.index("Ġthe")]
    assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert 2 in tok.eos_ids


def test_load_hf_and_the_resolver_accept_a_gguf_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_JAX_CACHE", str(tmp_path / "cache"))
    model = tiny_llama()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
    config, params = load_hf(path)
    tokens = _tokens(3, (1, 7))
    np.testing.assert_allclose(np.asarray(forward(config, params, jnp.asarray(tokens))),
                               _logits(model, tokens), atol=1e-4)
    assert load_tokenizer(resolve_model_path(path)).encode(" the") == [TOKENS.index("Ġthe")]
    assert len(os.listdir(tmp_path / "cache" / "gguf")) == 1  # converted once, reused


def test_unsupported_architecture_names_the_key(tmp_path):
    path = write_tiny_gguf(tmp_path / "x.gguf", tiny_llama(), arch="falcon")
    with pytest.raises(ValueError, match=r"general.architecture is 'falcon'"):
        load_gguf(path)


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "x.gguf", tiny_llama(),
                           types={"blk.1.attn_v.weight": Q.Q5_1})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_import, "_QUANT_TYPES", ("F32",))
        with pytest.raises(ValueError, match=r"tensor 'blk.1.attn_v.weight' has type Q5_1"):
            load_gguf(path)


def test_missing_metadata_key_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((VOCAB, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"metadata key 'llama.attention.head_count' is missing"):
        load_gguf(tmp_path / "x.gguf")


def test_foreign_and_missing_files_get_one_line_errors(tmp_path):
    # Cut and damaged GGUF files, each variant: test_gguf_corrupt.py.
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match=r"model.safetensors: not a GGUF file"):
        load_gguf(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "absent.gguf")
