"""The server under abuse: huge bodies, dropped streams, out-of-range values."""

import threading
import time

import httpx
import pytest
from test_server import API_KEY, tiny_model

from align_jax.generate import server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def served(model_files):
    tok, cfg, params = model_files
    app = server.make_app(cfg, params, tok, model_name="tiny", api_key=API_KEY,
                          max_new_tokens_limit=120, batch_window_s=0.005,
                          max_body_bytes=2 * 2**20)
    srv = server.ServerThread(app)
    yield app, srv
    srv.stop()


def test_a_4mb_request_is_413_and_health_stays_fast(model_files):
    """The default limit (the context's worth of bytes) turns a 4 MB body away at once."""
    tok, cfg, params = model_files
    srv = server.ServerThread(server.make_app(cfg, params, tok, model_name="tiny"))
    try:
        waits, result = _health_during(srv, "/tokenize", 4 * 2**20)
        bound = _bound(srv)
    finally:
        srv.stop()
    assert result.status_code == 413 and "limit" in result.json()["error"]["message"]
    assert max(waits) < bound, waits


def test_health_answers_fast_while_a_large_body_is_tokenized(served):
    """Tokenization runs off the event loop (1 MB here, under a raised limit)."""
    _, srv = served
    waits, result = _health_during(srv, "/tokenize", 2**20)
    assert result.status_code == 200, result.text[:300]
    assert result.json()["count"] > 2**20 // 8
    assert max(waits) < _bound(srv), waits


def _bound(srv):
    """0.5 s, plus what an idle /health takes on this (possibly loaded, shared) machine."""
    idle = []
    for _ in range(3):
        t = time.perf_counter()
        httpx.get(srv.url + "/health", timeout=10)
        idle.append(time.perf_counter() - t)
    return 0.5 + 2 * max(idle)


def _health_during(srv, path, size):
    body = {"prompt": "honesty care fairness " * (size // 22)}
    done = {}

    def big():
        t = time.perf_counter()
        done["response"] = httpx.post(srv.url + path, json=body, headers=HEADERS,
                                      timeout=300)
        done["seconds"] = time.perf_counter() - t

    thread = threading.Thread(target=big)
    thread.start()
    waits = []
    time.sleep(0.05)
    while thread.is_alive():
        t = time.perf_counter()
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        waits.append(time.perf_counter() - t)
        time.sleep(0.05)
    thread.join()
    t = time.perf_counter()
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    waits.append(time.perf_counter() - t)
    return waits, done["response"]


def test_a_body_over_the_limit_is_413(served):
    _, srv = served
    r = httpx.post(srv.url + "/v1/completions", headers=HEADERS, timeout=60,
                   json={"prompt": "x" * (3 * 2**20), "max_tokens": 2})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


@pytest.mark.parametrize("field,value", [("top_k", "1099511627776"), ("temperature", "1e400"),
                                         ("temperature", "-1.0"), ("repetition_penalty", "0"),
                                         ("top_p", "1.5"), ("seed", '"7"')])
def test_out_of_range_values_are_400(served, field, value):
    _, srv = served
    raw = f'{{"prompt": "x", "max_tokens": 2, "{field}": {value}}}'
    r = httpx.post(srv.url + "/v1/completions", timeout=60, content=raw,
                   headers={**HEADERS, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"] or r.json()["error"]["param"] == field


def test_a_dropped_stream_stops_its_generation(served):
    app, srv = served
    batcher = app.state.batcher
    short = {"prompt": "x", "max_tokens": 4, "temperature": 0}
    httpx.post(srv.url + "/v1/completions", headers=HEADERS, timeout=120, json=short)  # compiled
    before = batcher.cancelled
    body = {"prompt": "The quick brown", "max_tokens": 100, "temperature": 1.0, "seed": 1,
            "stream": True, "stop": ["never-appears-here"]}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=HEADERS,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        next(r.iter_lines())  # the first delta: generation is running; then hang up
    deadline = time.time() + 30
    while batcher.cancelled == before and time.time() < deadline:
        time.sleep(0.05)
    assert batcher.cancelled == before + 1
    t = time.perf_counter()
    r = httpx.post(srv.url + "/v1/completions", headers=HEADERS, timeout=60, json=short)
    assert r.status_code == 200 and time.perf_counter() - t < 5
