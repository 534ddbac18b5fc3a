"""The server fails fast and stays bounded: quiet client disconnects, bad ports refused before
anything loads, empty prompts and out-of-range seeds refused, per-request caps on prompts and
tokens, and a bounded cache of compiled programs."""

import gc
import json
import logging
import socket
import time
import weakref

import httpx
import pytest
from test_server import API_KEY, tiny_model

from align_jax import cli
from align_jax.generate import generate, server, shape_cache

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def served(model):
    tok, cfg, params = model
    app = server.make_app(cfg, params, tok, model_name="tiny", api_key=API_KEY,
                          max_new_tokens_limit=64, batch_window_s=0.005,
                          max_prompts_per_request=4, max_request_tokens=100)
    srv = server.ServerThread(app)
    yield app, srv
    srv.stop()


def _post(srv, body):
    return httpx.post(srv.url + "/v1/completions", json=body, headers=HEADERS, timeout=120)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_that_leaves_mid_body_logs_one_line_at_most(served):
    """Before: each such client logged uvicorn's ~60-line "Exception in ASGI application"."""
    _, srv = served
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "align_jax")]
    for lg in loggers:
        lg.addHandler(records)
    try:
        body = json.dumps({"prompt": "x" * 1000, "max_tokens": 4}).encode()
        for _ in range(3):
            with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
                             b"Bearer " + API_KEY.encode() + b"\r\nContent-Type: application/"
                             b"json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:100])
                time.sleep(0.2)  # the handler is reading the body; then hang up
        time.sleep(1.0)
        r = _post(srv, {"prompt": "x", "max_tokens": 2})  # the server is fine
        assert r.status_code == 200, r.text
    finally:
        for lg in loggers:
            lg.removeHandler(records)
    assert all(rec.exc_info is None for rec in records.records), [
        rec.getMessage() for rec in records.records]
    assert all("\n" not in rec.getMessage().strip() for rec in records.records)
    assert len(records.records) <= 3


@pytest.mark.parametrize("prompt", ["", ["a fox", ""]])
def test_empty_prompts_are_400(served, prompt):
    _, srv = served
    r = _post(srv, {"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and "empty" in error["message"]


@pytest.mark.parametrize("seed", [2**70, 2**63, -2**63 - 1])
def test_out_of_range_seeds_are_400(served, seed):
    _, srv = served
    r = _post(srv, {"prompt": "a fox", "max_tokens": 2, "seed": seed, "temperature": 1.0})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("seed", [2**63 - 1, -2**63, 0])
def test_int64_seeds_are_accepted(served, seed):
    _, srv = served
    r = _post(srv, {"prompt": "a fox", "max_tokens": 2, "seed": seed, "temperature": 1.0})
    assert r.status_code == 200, r.text


def test_more_prompts_than_the_cap_is_400(served):
    _, srv = served
    assert _post(srv, {"prompt": ["a fox"] * 4, "max_tokens": 2}).status_code == 200
    r = _post(srv, {"prompt": ["a fox"] * 5, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert "5 prompts" in r.json()["error"]["message"] and "at most 4" in r.json()[
        "error"]["message"]


def test_more_tokens_than_the_cap_is_400(served):
    _, srv = served
    ids = [300, 301, 302]
    fits = (100 - 2 * len(ids)) // 2  # two prompts of 3 tokens + `fits` new tokens each: 100
    r = _post(srv, {"prompt": [ids] * 2, "max_tokens": fits})
    assert r.status_code == 200, r.text
    r = _post(srv, {"prompt": [ids] * 2, "max_tokens": fits + 1})
    assert r.status_code == 400, r.text
    assert "at most 100" in r.json()["error"]["message"]


def test_bad_caps_are_refused(model):
    tok, cfg, params = model
    with pytest.raises(ValueError, match="max_prompts_per_request"):
        server.make_app(cfg, params, tok, model_name="t", max_prompts_per_request=0)


# ----------------------------------------------------------------------------- ports


@pytest.mark.parametrize("port", [99999, -1, 65536])
def test_invalid_ports_fail_at_once(port):
    with pytest.raises(ValueError, match=f"port={port}") as e:
        server.bind_socket("127.0.0.1", port)
    assert "\n" not in str(e.value)


def test_a_port_in_use_fails_at_once():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            server.bind_socket("127.0.0.1", port)


def test_serve_with_a_bad_port_exits_before_loading_the_model(tmp_path, capsys):
    """The model dir does not exist: the port is refused before it would be read."""
    t = time.perf_counter()
    code = cli.main(["serve", f"--gin_param=server.serve_main.model_dir='{tmp_path}/none'",
                     "--gin_param=server.serve_main.port=99999",
                     f"--output_dir={tmp_path}/run"])
    assert code == 1 and time.perf_counter() - t < 30
    err = capsys.readouterr().err
    assert "port=99999" in err and "Exception" not in err, err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- compiled shapes


@pytest.fixture()
def program_limit():
    before = shape_cache.max_programs()
    yield shape_cache.set_max_programs
    shape_cache.set_max_programs(before)


def test_compiled_programs_stay_under_the_cap_and_evicted_ones_are_freed(model,
                                                                          program_limit):
    """Many distinct shapes (budgets 1..6 and two prompt lengths): never more than the cap
    of programs is kept; each kept wrapper holds one program (jax's own cache size); dropped
    ones are garbage (weakrefs die); a shape compiled again gives the same tokens."""
    tok, cfg, params = model
    program_limit(3)
    prompts = [tok.encode("a fox jumps"), tok.encode("honesty care fairness and respect")]
    first = generate(cfg, params, prompts[:1], max_new_tokens=1, tokenizer=tok).tokens
    refs, seen = [], 0
    for budget in range(1, 7):
        for p in prompts:
            generate(cfg, params, [p], max_new_tokens=budget, tokenizer=tok)
            kept = shape_cache.cached_functions()
            assert shape_cache.stats()["programs"] == len(kept) <= 3
            assert all(f._cache_size() <= 1 for f in kept)
            refs.extend(weakref.ref(f) for f in kept)
            seen += 1
    assert shape_cache.stats()["evictions"] >= seen  # prefill + decode per shape, cap 3
    kept = {id(f) for f in shape_cache.cached_functions()}
    gc.collect()
    dead = [r for r in refs if r() is None]
    alive = {id(r()) for r in refs if r() is not None}
    assert dead and alive <= kept
    again = generate(cfg, params, prompts[:1], max_new_tokens=1, tokenizer=tok).tokens
    assert again == first


def test_the_server_sets_the_cap(model, program_limit):
    tok, cfg, params = model
    server.make_app(cfg, params, tok, model_name="t", max_compiled_shapes=5)
    assert shape_cache.max_programs() == 5
    with pytest.raises(ValueError, match="max_compiled_shapes"):
        server.make_app(cfg, params, tok, model_name="t", max_compiled_shapes=0)


# ----------------------------------------------------------------------------- unknown fields


def test_unknown_fields_are_ignored_with_one_warning(served, caplog):
    _, srv = served
    body = {"prompt": "a fox", "max_tokens": 2, "temperature": 0, "bogus_field": 1}
    with caplog.at_level(logging.WARNING, logger="align_jax"):
        first = _post(srv, body)
        second = _post(srv, body)
    assert first.status_code == second.status_code == 200, first.text
    plain = _post(srv, {k: v for k, v in body.items() if k != "bogus_field"})
    assert first.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    warned = [r for r in caplog.records if "bogus_field" in r.getMessage()
              and r.levelno == logging.WARNING]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]


def test_unknown_nested_fields_are_dropped_and_other_errors_still_count(served):
    _, srv = served
    chat = {"messages": [{"role": "user", "content": "hi", "extra": 1}], "max_tokens": 2}
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat, headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    r = _post(srv, {"prompt": "a fox", "max_tokens": "2", "bogus_field": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    # An unknown kind of constraint would change what is generated: never dropped.
    r = _post(srv, {"prompt": "a fox", "max_tokens": 2,
                    "structured_outputs": {"grammar": "root ::= x"}})
    assert r.status_code == 400 and "structured_outputs.grammar" in r.json()["error"][
        "message"], r.text


def test_strict_keeps_unknown_fields_400(model):
    tok, cfg, params = model
    app = server.make_app(cfg, params, tok, model_name="tiny", api_key=API_KEY, strict=True,
                          max_new_tokens_limit=8)
    srv = server.ServerThread(app)
    try:
        r = _post(srv, {"prompt": "a fox", "max_tokens": 2, "bogus_field": 1})
    finally:
        srv.stop()
    assert r.status_code == 400 and "unknown field 'bogus_field'" in r.json()["error"][
        "message"], r.text


# ----------------------------------------------------------------------------- endpoints


def test_tokenize_and_detokenize_round_trip(served, model):
    tok = model[0]
    _, srv = served
    text = "Honesty, care, fairness and respect"
    r = httpx.post(srv.url + "/v1/tokenize", json={"prompt": text, "add_special_tokens": False},
                   headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == tok.encode(text, add_bos=False)
    r = httpx.post(srv.url + "/detokenize", json={"tokens": r.json()["tokens"]},
                   headers=HEADERS, timeout=60)
    assert r.status_code == 200 and r.json() == {"prompt": text}, r.text
    r = httpx.post(srv.url + "/v1/detokenize", json={"tokens": [1, 99999]}, headers=HEADERS,
                   timeout=60)
    assert r.status_code == 400 and "99999" in r.json()["error"]["message"], r.text


def test_version(served):
    import align_jax

    _, srv = served
    r = httpx.get(srv.url + "/version", timeout=60)
    assert r.json() == {"version": align_jax.__version__}


def _metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_requests_tokens_and_latency(served):
    _, srv = served
    before = httpx.get(srv.url + "/metrics", headers=HEADERS, timeout=60).text
    ok = _post(srv, {"prompt": [[300, 301]], "max_tokens": 3, "temperature": 0})
    bad = _post(srv, {"prompt": "", "max_tokens": 3})
    assert ok.status_code == 200 and bad.status_code == 400
    r = httpx.get(srv.url + "/metrics", headers=HEADERS, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    ok_line = 'align_jax_requests_total{path="/v1/completions",status="200"}'
    bad_line = 'align_jax_requests_total{path="/v1/completions",status="400"}'
    for line, grew in ((ok_line, 1), (bad_line, 1)):
        was = _metric(before, line) if line in before else 0
        assert _metric(after, line) == was + grew
    used = ok.json()["usage"]
    assert (_metric(after, "align_jax_prompt_tokens_total")
            - _metric(before, "align_jax_prompt_tokens_total")) == used["prompt_tokens"]
    assert (_metric(after, "align_jax_generation_tokens_total")
            - _metric(before, "align_jax_generation_tokens_total")) == used["completion_tokens"]
    count = "align_jax_request_latency_seconds_count"
    assert _metric(after, count) == _metric(before, count) + 2
    assert _metric(after, "align_jax_queue_requests") == 0
    assert _metric(after, 'align_jax_request_latency_seconds_bucket{le="+Inf"}') == _metric(
        after, count)


# ----------------------------------------------------------------------------- n > 1


def _openai(srv):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, timeout=120, max_retries=0)


def test_n_choices_are_the_rows_of_their_own_seeds(served):
    """Choice i*n + j samples prompt i with row_seed(seed, i*n + j): the same text a single
    request with that seed gives (row 0 of a request keeps its seed)."""
    from align_jax.generate.sampling import row_seed

    _, srv = served
    prompts, seed = [[300, 301], [302, 303, 304]], 11
    body = {"prompt": prompts, "max_tokens": 6, "temperature": 1.0, "seed": seed}
    r = _post(srv, {**body, "n": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for k, c in enumerate(choices):
        one = _post(srv, {**body, "prompt": prompts[k // 2], "seed": row_seed(seed, k)})
        assert c["text"] == one.json()["choices"][0]["text"]
    assert r.json()["usage"]["prompt_tokens"] == 5  # each prompt counted once


def test_n_choices_stream_like_they_answer(served):
    _, srv = served
    client = _openai(srv)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "a fox"}], max_tokens=8,
              temperature=1.0, seed=5, n=3)
    whole = client.chat.completions.create(**kw)
    texts = [""] * 3
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert len(whole.choices) == 3


def test_n_counts_against_the_prompt_cap(served):
    _, srv = served
    r = _post(srv, {"prompt": ["a fox"] * 2, "max_tokens": 2, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


# ----------------------------------------------------------------------------- logprobs, echo

# Log-probs here come from a full forward pass, the references from the KV-cached prefill and
# decode: the same float32 math in another reduction order, so they agree to ~1e-6 per token;
# 1e-4 per token leaves room for that and nothing more.
LOGP_TOL = 1e-4


def test_echo_prompt_logprobs_equal_score_continuations(served, model):
    from align_jax.generate import score_continuations

    tok, cfg, params = model
    _, srv = served
    ids = tok.encode("The quick brown fox jumps over the lazy dog", add_bos=True)
    r = _post(srv, {"prompt": [ids], "max_tokens": 3, "temperature": 0, "echo": True,
                    "logprobs": 2})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    prompt_logps = lp["token_logprobs"][1:len(ids)]
    want = score_continuations(cfg, params, [ids[:1]], [[ids[1:]]])[0][0]
    assert sum(prompt_logps) == pytest.approx(want, abs=LOGP_TOL * len(ids))
    text = r.json()["choices"][0]["text"]
    assert text.startswith(tok.decode(ids)) and len(lp["tokens"]) == len(ids) + r.json()[
        "usage"]["completion_tokens"]


def test_completion_logprobs_are_the_generated_tokens_logprobs(served, model):
    tok, cfg, params = model
    _, srv = served
    ids = tok.encode("a fox jumps", add_bos=True)
    r = _post(srv, {"prompt": [ids], "max_tokens": 6, "temperature": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    out = generate(cfg, params, [ids], max_new_tokens=6, tokenizer=tok)
    assert lp["tokens"] == [tok.decode([t]) for t in out.tokens[0]]
    np_ref = [float(x) for x in out.logprobs[0]]
    assert lp["token_logprobs"] == pytest.approx(np_ref, abs=LOGP_TOL)
    for chosen, logp, alts in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 3 <= len(alts) <= 4 and alts[chosen] == logp
        # Greedy: the chosen token is the most likely one.
        assert max(alts.values()) == pytest.approx(logp, abs=LOGP_TOL)
    assert lp["text_offset"][0] == 0


def test_chat_logprobs_through_the_openai_client(served):
    _, srv = served
    client = _openai(srv)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                 "content": "a fox"}],
                                       max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=LOGP_TOL)
        assert bytes(item.bytes).decode() == item.token
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                     "content": "a fox"}],
                                           max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content


@pytest.mark.parametrize("body,param", [
    ({"prompt": "a fox", "max_tokens": 2, "logprobs": 2, "stream": True}, "logprobs"),
    ({"prompt": "a fox", "max_tokens": 2, "echo": True, "stream": True}, "echo"),
    ({"prompt": "a fox", "max_tokens": 2, "logprobs": 21}, "logprobs")])
def test_unsupported_logprob_combinations_are_400(served, body, param):
    _, srv = served
    r = _post(srv, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_top_logprobs_needs_logprobs(served):
    _, srv = served
    r = httpx.post(srv.url + "/v1/chat/completions", headers=HEADERS, timeout=60,
                   json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                         "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text


# ----------------------------------------------------------------------------- penalties, bias


def _reference_greedy(model, ids, steps, *, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding written out here: a full forward pass per step, OpenAI's penalties over
    the generated tokens and the bias added in numpy, argmax; stops at EOS."""
    import numpy as np

    from align_jax.models.transformer import forward

    tok, cfg, params = model
    seq, out = list(ids), []
    for _ in range(steps):
        logits = np.asarray(forward(cfg, params, np.asarray([seq], np.int32)))[0, -1]
        count = np.bincount(np.asarray(out, np.int64), minlength=cfg.vocab_size)
        logits = logits - frequency * count - presence * (count > 0)
        for i, b in (bias or {}).items():
            logits[i] += b
        t = int(np.argmax(logits))
        out.append(t)
        seq.append(t)
        if t == tok.eos_id:
            break
    return out


def test_presence_and_frequency_penalties_follow_openai(served, model):
    tok, cfg, params = model
    _, srv = served
    ids = tok.encode("a fox jumps", add_bos=True)
    body = {"prompt": [ids], "max_tokens": 12, "temperature": 0}
    plain = _post(srv, body).json()
    r = _post(srv, {**body, "presence_penalty": 0.7, "frequency_penalty": 1.5})
    assert r.status_code == 200, r.text
    got = tok.encode(r.json()["choices"][0]["text"], add_bos=False)
    want = _reference_greedy(model, ids, 12, presence=0.7, frequency=1.5)
    assert tok.decode(want) == r.json()["choices"][0]["text"], (got, want)
    assert r.json()["choices"][0]["text"] != plain["choices"][0]["text"]  # they acted


def test_logit_bias_through_the_openai_client(served, model):
    tok = model[0]
    _, srv = served
    client = _openai(srv)
    forced = client.completions.create(model="tiny", prompt=[300, 301], max_tokens=5,
                                       temperature=0, logit_bias={"302": 100})
    assert forced.choices[0].text == tok.decode([302] * 5)
    assert forced.choices[0].finish_reason == "length"
    first = client.completions.create(model="tiny", prompt=[300, 301], max_tokens=1,
                                      temperature=0)
    banned = tok.encode(first.choices[0].text, add_bos=False)[0]
    other = client.completions.create(model="tiny", prompt=[300, 301], max_tokens=1,
                                      temperature=0, logit_bias={str(banned): -100})
    want = _reference_greedy(model, [300, 301], 1, bias={banned: -100.0})
    assert other.choices[0].text == tok.decode(want) != first.choices[0].text


@pytest.mark.parametrize("field,value", [("logit_bias", {"99999": 1}),
                                         ("logit_bias", {"fox": 1}),
                                         ("logit_bias", {"5": 101}),
                                         ("presence_penalty", 2.5),
                                         ("frequency_penalty", -3)])
def test_bad_penalties_and_biases_are_400(served, field, value):
    _, srv = served
    r = _post(srv, {"prompt": "a fox", "max_tokens": 2, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
