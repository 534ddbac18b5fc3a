"""Structured output through `align-jax serve`'s HTTP API with the official `openai` client:
response_format, vLLM's guided_* and structured_outputs, streaming, and bad requests."""

import json
import re

import httpx
import jsonschema
import openai
import pytest
from test_server import tiny_model

from align_jax.generate import server

SCHEMA = {"type": "object", "properties": {
    "answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 1, "maximum": 5},
    "why": {"type": "string", "maxLength": 24}},
    "required": ["answer", "score", "why"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Is honesty a value? Answer in JSON."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok, cfg, params = tiny_model(tmp_path_factory.mktemp("tok"))
    app = server.make_app(cfg, params, tok, model_name="tiny", max_new_tokens_limit=96,
                          max_prompt_tokens=100, batch_window_s=0.005)
    srv = server.ServerThread(app)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", timeout=300, max_retries=0)
    yield srv, client
    client.close()
    srv.stop()


def _valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_response_format_json_schema_greedy_sampled_and_streamed(served):
    _, client = served
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA,
                                                  "strict": True}}
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=7), dict(temperature=0.7, seed=1)):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80,
                                           response_format=fmt, **kw)
        choice = r.choices[0]
        assert choice.finish_reason == "stop" and _valid(choice.message.content), choice
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80,
                                          response_format=fmt, temperature=0.9, seed=3)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80,
                                                 response_format=fmt, temperature=0.9, seed=3,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and _valid(text)
    r = client.completions.create(model="tiny", prompt="Honesty:", max_tokens=80, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    # Any JSON object: strings are unbounded, so a random model may run out of budget first.
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:
        assert r.choices[0].text.startswith("{")


@pytest.mark.parametrize("extra,check", [
    ({"guided_choice": ["fairness", "care"]}, lambda t: t in ("fairness", "care")),
    ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"},
     lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    ({"guided_json": SCHEMA}, _valid),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"regex": "(ab)+c"}}, lambda t: re.fullmatch("(ab)+c", t)),
    ({"structured_outputs": {"json": SCHEMA}}, _valid),
])
def test_vllm_fields_on_completions_and_chat(served, extra, check):
    _, client = served
    for temperature in (0, 1.0):
        r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=80,
                                      temperature=temperature, seed=5, extra_body=extra)
        assert check(r.choices[0].text), r.choices[0].text
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80,
                                           temperature=temperature, seed=5, extra_body=extra)
        assert check(r.choices[0].message.content), r.choices[0].message.content


@pytest.mark.parametrize("body,needle", [
    ({"guided_regex": "(a"}, "guided_regex: regex '(a' cannot be used"),
    ({"guided_json": {"type": "string", "format": "email"}}, "keyword 'format'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "needs json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "not guided_choice and guided_regex"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
    ({"guided_choice": []}, "non-empty list"),
])
def test_bad_constraints_are_400s_naming_them(served, body, needle):
    srv, client = served
    r = httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert "\n" not in r.json()["error"]["message"]
