"""Structured generation on SmolLM2-135M-Instruct (slow: a real 135M model on a CPU): the SDG
schema and a choice through `generate`, and the `openai` client against `align-jax serve`."""

import json
import re

import jsonschema
import openai
import pytest

from align_jax.generate import constraints as C
from align_jax.generate import generate, server
from align_jax.models import load_hf
from align_jax.tokenizer import encode_prompt, load_tokenizer

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
SCHEMA = {"type": "object", "properties": {
    "question": {"type": "string", "maxLength": 120},
    "answer": {"enum": ["yes", "no"]},
    "explanation": {"type": "string", "maxLength": 200}},
    "required": ["question", "answer", "explanation"], "additionalProperties": False}
ASK = ("Write one yes/no question about honesty at work, its answer and a short explanation, "
       "as JSON with the keys question, answer, explanation.")


def _valid(text):
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_generate_follows_the_sdg_schema_and_a_choice(smollm2_dir):
    config, params = load_hf(NAME)
    tok = load_tokenizer(smollm2_dir)
    prompts = [encode_prompt(tok, ASK), encode_prompt(tok, "Is lying to a customer honest?")]
    per = [C.json_schema(SCHEMA), C.choice(["yes", "no"])]
    for kw in (dict(), dict(temperature=0.8, top_p=0.95, seed=1)):
        out = generate(config, params, prompts, max_new_tokens=160, tokenizer=tok,
                       constraint=per, **kw)
        assert not any(out.incomplete), out.texts
        assert _valid(out.texts[0]) and out.texts[1] in ("yes", "no")


def test_openai_client_against_serve_on_smollm2(smollm2_dir):
    srv = server.ServerThread(server.app_from_checkpoint(NAME, max_new_tokens_limit=192))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", timeout=600,
                               max_retries=0)
        fmt = {"type": "json_schema", "json_schema": {"name": "qa", "schema": SCHEMA,
                                                      "strict": True}}
        for kw in (dict(temperature=0), dict(temperature=0.9, seed=3)):
            r = client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": ASK}], max_tokens=192,
                response_format=fmt, **kw)
            assert r.choices[0].finish_reason == "stop"
            assert _valid(r.choices[0].message.content), r.choices[0].message.content
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Is honesty a value?"}],
            max_tokens=8, temperature=0.7, seed=2, extra_body={"guided_choice": ["yes", "no"]})
        assert r.choices[0].message.content in ("yes", "no")
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Give a date."}], max_tokens=16,
            temperature=0, extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
        assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].message.content)
    finally:
        srv.stop()
