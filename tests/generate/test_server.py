"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP.

A tiny random model and a freshly trained tokenizer are served by uvicorn on a free localhost
port. Answers are checked against direct `generate` calls on the same model.
"""

import concurrent.futures
import threading

import httpx
import jax
import numpy as np
import openai
import pytest

from align_jax.generate import generate, sampling, server, serving
from align_jax.models.config import get_config
from align_jax.models.transformer import init_params
from align_jax.tokenizer_training import train_tokenizer

API_KEY = "test-key"
TEXT = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "Honesty, care, fairness and respect are values we write down and keep.",
        "A teacher reads a document and writes questions with grounded answers.",
        "Stop here, then go on: one two three four five six seven eight nine."]


def tiny_model(tmp_dir):
    """A tokenizer and a random model whose greedy text is readable (no byte pieces)."""
    tok = train_tokenizer(TEXT * 10, tmp_dir, vocab_size=320)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=128, init_std=0.3,
                     tie_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    params = init_params(cfg, jax.random.key(0))
    # Zero logits for pad/unk/bos, role markers and byte pieces: the random model then
    # prefers real pieces (and EOS stays possible), so texts are non-trivial strings.
    quiet = [i for i in range(263) if i != tok.eos_id]
    params["lm_head"] = params["lm_head"].at[:, np.asarray(quiet)].set(0.0)
    return tok, cfg, params


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def served(model):
    tok, cfg, params = model
    app = server.make_app(cfg, params, tok, model_name="tiny", api_key=API_KEY,
                          max_new_tokens_limit=64, max_prompt_tokens=100,
                          batch_window_s=0.005)
    srv = server.ServerThread(app)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, timeout=120,
                           max_retries=0)
    yield app, srv, client
    client.close()
    srv.stop()


def _reference(model, ids, max_tokens, **kw):
    tok, cfg, params = model
    out = generate(cfg, params, [ids], max_new_tokens=max_tokens, tokenizer=tok, **kw)
    return out.texts[0], out.finish_reasons[0], len(out.tokens[0])


def _post(srv, path, body, *, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(srv.url + path, content=raw, timeout=60,
                          headers={**headers, "Content-Type": "application/json"})
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=60)


def test_row_seed_keeps_the_first_row_and_separates_the_others():
    assert sampling.row_seed(7, 0) == 7 and sampling.row_seed(-1, 0) == 2**32 - 1
    seeds = {sampling.row_seed(7, i) for i in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**32 for s in seeds)


def test_models_endpoint(served):
    _, _, client = served
    (m,) = client.models.list().data
    assert m.id == "tiny" and m.owned_by == "align-jax"
    assert m.model_extra["max_model_len"] == 128


def test_completions_equal_direct_greedy_generate(served, model):
    _, _, client = served
    tok = model[0]
    prompts = ["The quick brown", "Honesty, care"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    total_completion = 0
    for prompt, choice in zip(prompts, r.choices):
        ids = tok.encode(prompt, add_bos=True)
        text, reason, n = _reference(model, ids, 16)
        assert choice.text == text and choice.finish_reason == reason
        total_completion += n
    assert text.strip(), "the test model should produce visible text"
    n_prompt = sum(len(tok.encode(p, add_bos=True)) for p in prompts)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt, total_completion, n_prompt + total_completion)
    # Token-id prompts are accepted too and give the same answer.
    ids = tok.encode(prompts[0], add_bos=True)
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_chat_uses_the_chat_template(served, model):
    _, _, client = served
    tok = model[0]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Which values do we keep?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                       temperature=0)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    text, reason, n = _reference(model, ids, 16)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n


def test_streamed_deltas_concatenate_to_the_greedy_text(served):
    _, _, client = served
    kw = dict(model="tiny", max_tokens=16, temperature=0)
    full = client.completions.create(prompt="A teacher reads", **kw).choices[0]
    chunks = list(client.completions.create(prompt="A teacher reads", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 1, "expected several deltas"
    assert "".join(texts) == full.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "text_completion" for c in chunks)

    messages = [{"role": "user", "content": "Write questions."}]
    full = client.chat.completions.create(messages=messages, **kw).choices[0]
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.message.content
    assert chunks[-1].choices[0].finish_reason == full.finish_reason


def test_streaming_is_live(served):
    """Deltas arrive while the answer is still being generated, not after it."""
    import time
    _, _, client = served
    kw = dict(model="tiny", prompt="Honesty, care", max_tokens=64, temperature=0)
    full = client.completions.create(**kw).choices[0]
    arrivals, texts = [], []
    for c in client.completions.create(stream=True, **kw):
        if c.choices and c.choices[0].text:
            arrivals.append(time.monotonic())
            texts.append(c.choices[0].text)
    assert "".join(texts) == full.text
    if full.finish_reason == "length":
        # 64 tokens in chunks of 8 decode steps: several deltas, sent as they are decoded.
        assert len(texts) >= 4, texts


def test_stop_string_cuts_the_text(served):
    _, _, client = served
    kw = dict(model="tiny", prompt="Stop here, then", max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2 and stop.strip()
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.text == full[:full.index(stop)] and r.finish_reason == "stop"


def test_sampling_is_seeded_and_independent_of_batching(served):
    app, _, client = served
    kw = dict(model="tiny", prompt="The lazy dog", max_tokens=16, temperature=1.0, seed=11)
    a = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == a
    others = {client.completions.create(**{**kw, "seed": s}).choices[0].text for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples"
    # Sent together with a greedy request and a top-k request, it still draws the same text.
    batcher = app.state.batcher
    old = batcher.window_s, batcher.max_batch_size
    batcher.window_s, batcher.max_batch_size = 10.0, 3
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            jobs = [pool.submit(client.completions.create, **kw),
                    pool.submit(client.completions.create, **{**kw, "temperature": 0}),
                    pool.submit(client.completions.create, **kw,
                                extra_body={"top_k": 5})]
            texts = [j.result().choices[0].text for j in jobs]
    finally:
        batcher.window_s, batcher.max_batch_size = old
    assert texts[0] == a


def test_concurrent_requests_share_one_generate_call(served, model, monkeypatch):
    app, _, client = served
    tok = model[0]
    calls = []
    real = serving.generate_stream

    def counting(config, params, prompts, **kw):
        calls.append((len(prompts), kw["max_new_tokens"]))
        return real(config, params, prompts, **kw)

    monkeypatch.setattr(serving, "generate_stream", counting)
    batcher = app.state.batcher
    monkeypatch.setattr(batcher, "window_s", 10.0)  # closes early: max_batch_size rows
    monkeypatch.setattr(batcher, "max_batch_size", 2)
    barrier = threading.Barrier(2)
    requests = [("The quick brown", 5), ("Honesty, care and", 16)]

    def send(prompt, max_tokens):
        barrier.wait()
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                         temperature=0).choices[0]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda a: send(*a), requests))
    assert calls == [(2, 16)], calls
    for (prompt, max_tokens), got in zip(requests, answers):
        text, reason, _ = _reference(model, tok.encode(prompt, add_bos=True), max_tokens)
        assert (got.text, got.finish_reason) == (text, reason)


BAD = {
    "bad json": (None, b'{"prompt": "x", max_tokens: 3}', "not valid JSON"),
    "not an object": (None, b'[1, 2]', "object"),
    "wrong type": ({"prompt": "x", "max_tokens": "3"}, None, "max_tokens"),
    "prompt type": ({"prompt": 3.5, "max_tokens": 3}, None, "prompt"),
    "zero max_tokens": ({"prompt": "x", "max_tokens": 0}, None, "max_tokens"),
    "huge max_tokens": ({"prompt": "x", "max_tokens": 10**6}, None, "max_tokens"),
    "too long prompt": ({"prompt": "fox " * 150, "max_tokens": 3}, None, "prompt has"),
    "prompt + budget": ({"prompt": "fox " * 25, "max_tokens": 60}, None, "context length"),
    "n = 0": ({"prompt": "x", "max_tokens": 3, "n": 0}, None, "'n'"),
    "unknown model": ({"model": "gpt-9", "prompt": "x", "max_tokens": 3}, None, "gpt-9"),
    "bad top_p": ({"prompt": "x", "max_tokens": 3, "top_p": 0}, None, "top_p"),
    "bad token id": ({"prompt": [1, 99999], "max_tokens": 3}, None, "99999"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_completion_requests_get_openai_errors(served, case):
    _, srv, client = served
    body, raw, needle = BAD[case]
    r = _post(srv, "/v1/completions", body, raw=raw)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"], err
    # The server keeps serving.
    ok = client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_bad_chat_requests(served):
    _, srv, _ = served
    cases = [({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
             ({"messages": [{"role": "user"}]}, "content"),
             ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
               "logprobs": True, "stream": True}, "logprobs")]
    for body, needle in cases:
        r = _post(srv, "/v1/chat/completions", body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_api_key_is_required(served):
    _, srv, _ = served
    for key in (None, "wrong"):
        r = _post(srv, "/v1/completions", {"prompt": "x", "max_tokens": 2}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    r = httpx.get(srv.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def test_tokenize_counts_like_the_tokenizer(served, model):
    _, srv, _ = served
    tok = model[0]
    r = _post(srv, "/tokenize", {"prompt": TEXT[1], "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode(TEXT[1]) and r["count"] == len(r["tokens"])


def test_a_failing_request_does_not_take_its_batch_down(served, model, monkeypatch):
    app, srv, client = served
    tok = model[0]
    poison = tok.encode("poison pill", add_bos=True)
    real = serving.generate_stream

    def fragile(config, params, prompts, **kw):
        if any(list(p) == poison for p in prompts):
            raise RuntimeError("device fell over")
        return real(config, params, prompts, **kw)

    monkeypatch.setattr(serving, "generate_stream", fragile)
    monkeypatch.setattr(app.state.batcher, "window_s", 10.0)
    monkeypatch.setattr(app.state.batcher, "max_batch_size", 2)
    barrier = threading.Barrier(2)

    def send(prompt):
        barrier.wait()
        return _post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 16,
                                              "temperature": 0})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good, bad = pool.map(send, ["The quick brown", "poison pill"])
    assert bad.status_code == 500 and "device fell over" in bad.json()["error"]["message"]
    assert good.status_code == 200
    text, _, _ = _reference(model, tok.encode("The quick brown", add_bos=True), 16)
    assert good.json()["choices"][0]["text"] == text
