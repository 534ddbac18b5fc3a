"""Raw (non-chat) prompts are tokenized as transformers' `tokenizer(text)` does, per family.

The reference is the tokenizer's own output through transformers.AutoTokenizer: SmolLM2 and
Qwen2 add nothing to a raw input, Llama-3 and Gemma add BOS (tests/tokenizer_families.py). The
prompt encoder, the server (/v1/completions, /tokenize) and `align-jax generate` with chat=False
must all agree with it.
"""

import json
import os
import shutil

import httpx
import jax
import pytest
from tokenizer_families import FAMILIES, build_family_tokenizer
from transformers import AutoTokenizer

from align_jax.generate import generate, server
from align_jax.generate.entry import generate_main
from align_jax.models.config import get_config
from align_jax.models.hf import save_hf
from align_jax.models.transformer import init_params
from align_jax.tokenizer import encode_prompt, load_tokenizer
from align_jax.tokenizer_training import train_tokenizer

PROMPTS = ["The sky is", "Once upon a time", "One two three"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family_tokenizer(f, str(root / f)) for f in FAMILIES}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_raw_prompt_ids_equal_the_tokenizers_own(family_dirs, family):
    path = family_dirs[family]
    hf = AutoTokenizer.from_pretrained(path)
    tok = load_tokenizer(path)
    bos = FAMILIES[family]["bos"]
    for text in PROMPTS:
        want = hf(text)["input_ids"]
        assert encode_prompt(tok, text, chat_template=False) == want
        assert tok.encode_input(text) == want
        # The family's rule, stated independently of transformers.
        assert (bos is not None and want[0] == hf.convert_tokens_to_ids(bos)) == (
            bos is not None)
    # Messages without a chat template: contents joined by blank lines, the same rule.
    joined = "The sky is\n\nOnce upon a time"
    messages = [{"role": "user", "content": "The sky is"},
                {"role": "user", "content": "Once upon a time"}]
    assert encode_prompt(tok, messages, chat_template=False) == hf(joined)["input_ids"]


def test_smollm2_style_has_a_bos_token_but_adds_none(family_dirs):
    # The tester's case: the tokenizer names a BOS token, yet `tokenizer(text)` adds none.
    tok = load_tokenizer(family_dirs["smollm2"])
    assert tok.bos_id is not None
    assert tok.bos_id not in encode_prompt(tok, "The sky is", chat_template=False)


def test_sentencepiece_model_and_its_hf_dir_both_add_bos(tmp_path):
    hf_tok = train_tokenizer(["The sky is blue. Once upon a time."] * 20, tmp_path,
                             vocab_size=300)
    sp_tok = load_tokenizer(tmp_path / "tokenizer.model")
    want = AutoTokenizer.from_pretrained(str(tmp_path))("The sky is")["input_ids"]
    assert want[0] == hf_tok.bos_id
    assert hf_tok.encode_input("The sky is") == sp_tok.encode_input("The sky is") == want


def _family_model(family_dirs, tmp_path_factory, family):
    """A tiny random model saved with `family`'s tokenizer as an HF dir."""
    tok_dir = family_dirs[family]
    tok = load_tokenizer(tok_dir)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=128, init_std=0.3,
                     tie_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    params = init_params(cfg, jax.random.key(0))
    model_dir = str(tmp_path_factory.mktemp("model"))
    save_hf(cfg, params, model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), model_dir)
    return model_dir, tok, cfg, params


@pytest.fixture(scope="module")
def smollm2_style_model(family_dirs, tmp_path_factory):
    return _family_model(family_dirs, tmp_path_factory, "smollm2")


def _greedy(cfg, params, tok, ids, n):
    return generate(cfg, params, [ids], max_new_tokens=n, tokenizer=tok).texts[0]


def test_server_completions_and_tokenize_use_the_tokenizers_rules(smollm2_style_model):
    model_dir, tok, cfg, params = smollm2_style_model
    hf = AutoTokenizer.from_pretrained(model_dir)
    app = server.make_app(cfg, params, tok, model_name="tiny", api_key="k",
                          max_new_tokens_limit=16, max_prompt_tokens=100, batch_window_s=0.005)
    srv = server.ServerThread(app)
    headers = {"Authorization": "Bearer k"}
    try:
        for text in PROMPTS:
            want = hf(text)["input_ids"]
            r = httpx.post(srv.url + "/tokenize", json={"prompt": text}, headers=headers,
                           timeout=60).json()
            assert r["tokens"] == want
            r = httpx.post(srv.url + "/v1/completions", headers=headers, timeout=120,
                           json={"model": "tiny", "prompt": text, "max_tokens": 8,
                                 "temperature": 0}).json()
            assert r["usage"]["prompt_tokens"] == len(want)
            assert r["choices"][0]["text"] == _greedy(cfg, params, tok, want, 8)
    finally:
        srv.stop()


@pytest.mark.parametrize("family", ["smollm2", "llama3"])
def test_generate_entry_raw_prompts_use_the_tokenizers_rules(family_dirs, tmp_path_factory,
                                                             tmp_path, family):
    model_dir, tok, cfg, params = _family_model(family_dirs, tmp_path_factory, family)
    hf = AutoTokenizer.from_pretrained(model_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert generate_main(output_dir=str(tmp_path / "gen"), model_dir=model_dir,
                         prompts=str(prompts), chat=False, max_new_tokens=8) == 0
    rows = [json.loads(x) for x in open(tmp_path / "gen" / "completions.jsonl")]
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:
        want = hf(row["prompt"])["input_ids"]
        assert row["completion"] == _greedy(cfg, params, tok, want, 8)


@pytest.mark.slow
def test_smollm2_raw_prompt_greedy_continuation_equals_transformers(smollm2_dir):
    """The tester's report: SmolLM2 continues "The sky is" as transformers does only when the
    raw prompt gets no BOS. Both sides run the same converted float32 checkpoint; greedy
    argmax over float32 logits can only split on a near-tie, which these prompts do not hit
    in 8 tokens (a mismatch names the prompt)."""
    import torch
    from transformers import AutoModelForCausalLM

    from align_jax.models import load_hf

    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = load_tokenizer("smollm2-135m-instruct")
    config, params = load_hf("smollm2-135m-instruct")
    for text in ["The sky is", "Once upon a time", "The capital of France is"]:
        want_ids = hf_tok(text)["input_ids"]
        ids = encode_prompt(tok, text, chat_template=False)
        assert ids == want_ids and ids[0] != tok.bos_id
        with torch.no_grad():
            out = model.generate(torch.tensor([want_ids]), max_new_tokens=8, do_sample=False)
        want = out[0, len(want_ids):].tolist()
        got = generate(config, params, [ids], max_new_tokens=8, tokenizer=tok).tokens[0]
        assert got == want[:len(got)] and len(got) >= 1, (text, tok.decode(got),
                                                          tok.decode(want))
