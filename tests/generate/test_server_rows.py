"""`align-jax serve` with continuous batching (row_batcher.py) over real HTTP: answers equal
`generate`'s, streams arrive token by token, and a full queue is a 503 with Retry-After."""

import json

import httpx
import jax
import numpy as np
import pytest

from align_jax.generate import generate, loop, server, serving
from align_jax.generate.row_batcher import Queueing, RowBatcher
from align_jax.models.config import get_config
from align_jax.models.transformer import init_params
from align_jax.tokenizer_training import train_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "Honesty, care, fairness and respect are values we write down and keep.",
        "A teacher reads a document and writes questions with grounded answers."]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = train_tokenizer(TEXT * 10, tmp_path_factory.mktemp("tok"), vocab_size=300)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=64, init_std=0.3,
                     tie_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    params = init_params(cfg, jax.random.key(0))
    # Byte pieces and specials get zero logits, so the random model writes readable pieces.
    params["lm_head"] = params["lm_head"].at[:, np.asarray(
        [i for i in range(263) if i != tok.eos_id])].set(0.0)
    return tok, cfg, params


@pytest.fixture(scope="module")
def served(model):
    tok, cfg, params = model
    app = server.make_app(cfg, params, tok, model_name="tiny", max_len=64, max_prompt_tokens=32,
                          max_new_tokens_limit=24, max_batch_size=2,
                          queueing=Queueing(max_queue=8, chunk=4))
    srv = server.ServerThread(app)
    app.state.batcher.ready.wait(timeout=600)
    yield app, srv
    srv.stop()


def _post(srv, body):
    return httpx.post(srv.url + "/v1/completions", json={"model": "tiny", **body}, timeout=300)


def test_answers_equal_generate_with_more_prompts_than_rows(model, served):
    tok, cfg, params = model
    app, srv = served
    assert isinstance(app.state.batcher, RowBatcher)
    warm = loop.trace_counts()
    prompts = ["The quick brown", "Honesty, care", "A teacher reads a document"]
    r = _post(srv, {"prompt": prompts, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    ids = [tok.encode(p, add_bos=True) for p in prompts]
    ref = generate(cfg, params, ids, max_new_tokens=12, tokenizer=tok)
    assert texts == ref.texts
    assert app.state.batcher.engine.inserts >= 3
    for name in ("rows_insert", "rows_decode"):
        assert loop.trace_counts()[name] == warm[name]


def test_stream_sends_text_as_it_is_decoded(model, served):
    tok, cfg, params = model
    _, srv = served
    body = {"model": "tiny", "prompt": "Honesty, care", "max_tokens": 16, "temperature": 0,
            "stream": True}
    pieces = []
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["text"]:
                    pieces.append(choice["text"])
    ref = generate(cfg, params, [tok.encode("Honesty, care", add_bos=True)], max_new_tokens=16,
                   tokenizer=tok)
    assert "".join(pieces) == ref.texts[0]
    if ref.finish_reasons[0] == "length":
        # 16 tokens in host checks every 2 steps: the text arrives in several pieces.
        assert len(pieces) >= 4


def test_full_queue_is_a_503_with_retry_after(model):
    tok, cfg, params = model
    app = server.make_app(cfg, params, tok, model_name="tiny", max_len=48,
                          queueing=Queueing(continuous=False, max_queue=0, retry_after_s=3))
    srv = server.ServerThread(app)
    try:
        for stream in (False, True):
            r = _post(srv, {"prompt": "The quick", "max_tokens": 4, "stream": stream})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "overloaded"
    finally:
        srv.stop()


def test_row_batcher_refuses_beyond_max_queue(model):
    tok, cfg, params = model
    b = RowBatcher(cfg, params, tok, max_len=48, max_batch_size=2, max_queue=0)
    job = serving.Job(prompts=[[5, 6]], max_tokens=2, sampling={"temperature": 0.0},
                      seeds=[0], stop=())
    with pytest.raises(serving.Overloaded, match="max_queue=0"):
        b.submit(job)
    assert b._thread is None  # refused before any work started
