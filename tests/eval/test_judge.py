"""The pairwise judge behind a real `openai:` endpoint: a scripted OpenAI-compatible server."""

import hashlib
import http.server
import json
import re
import threading

import numpy as np
import pytest

from align_jax.eval.judge import (
    load_judge_template,
    pairwise_win_rate,
    parse_verdict,
    win_rate_matrix,
)
from align_jax.sdg.backends import make_teacher

_PAIR = re.compile(r"Response A:\n(.*?)\n\n(?:###)?Response B:\n(.*?)\n\n(?:###Reference|Which)",
                   re.DOTALL)


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def scripted_verdict(mode: str, first: str, second: str) -> str:
    """What the scripted judge says about (slot A, slot B)."""
    if mode == "always_a":
        return "Both are fine, A reads better.\n[RESULT] A"
    if mode == "longer":
        return "[RESULT] " + ("A" if len(first.split()) > len(second.split()) else "B")
    if mode == "garbage":
        return "I cannot decide between these. Maybe both?"
    if mode == "keyword":  # prefers the response that mentions "report"; else slot B
        return "Feedback... [RESULT] " + ("A" if "report" in first and "report" not in second
                                          else "B")
    # "mixed": a content-driven verdict, with one judgement in 5 unparseable
    h = _h(first + "|" + second)
    if h % 5 == 0:
        return "no verdict here"
    return f"The better one is clear.\n[RESULT] {'A' if _h(first) % 3 else 'B'}"


class _Judge(http.server.BaseHTTPRequestHandler):
    mode = "always_a"
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        type(self).seen.append(body)
        first, second = _PAIR.search(prompt).groups()
        text = scripted_verdict(type(self).mode, first, second)
        data = json.dumps({"id": "j", "object": "chat.completion", "created": 0, "model": "judge",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}]
                           }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    handler = type("Handler", (_Judge,), {"seen": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    teacher = make_teacher(f"openai:http://127.0.0.1:{srv.server_address[1]}/v1", model="judge",
                           context_length=8192, concurrency=8, max_retries=0)
    yield handler, teacher
    teacher.close()
    srv.shutdown()
    srv.server_close()


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = "gift report manager policy refuse value honest meal travel record".split()
    prompts = [f"Question {i}: what should I do about the {words[i % 10]}?" for i in range(n)]
    la, lb = rng.integers(5, 80, n), rng.integers(3, 40, n)
    a = [" ".join(rng.choice(words, k)) + f" a{i}" for i, k in enumerate(la)]
    b = [" ".join(rng.choice(words, k)) + f" b{i}" for i, k in enumerate(lb)]
    refs = [f"reference {i}" for i in range(n)]
    return prompts, a, b, refs


def test_always_a_judge_has_win_rate_half_and_full_position_bias(server):
    handler, teacher = server
    handler.mode, handler.seen[:] = "always_a", []
    prompts, a, b, refs = _data()
    res = pairwise_win_rate(prompts, a, b, judge=teacher, references=refs, seed=3)
    assert res.win_rate == 0.5 and res.position_bias == 1.0 and res.parse_failures == 0
    assert res.position_bias_pairs == res.n_pairs == 40 and res.n_judgements == 80
    assert res.stderr == 0.0
    # Both orders of every pair were asked, with the reference, greedy, with the seed.
    assert len(handler.seen) == 80
    shown = [_PAIR.search(s["messages"][-1]["content"]).groups() for s in handler.seen]
    assert sorted(shown) == sorted([(x, y) for x, y in zip(a, b)] + list(zip(b, a)))
    assert all("reference" in s["messages"][-1]["content"] for s in handler.seen)
    assert {s["temperature"] for s in handler.seen} == {0.0}


def test_length_driven_judge_is_caught_by_length_control(server):
    handler, teacher = server
    handler.mode = "longer"
    prompts, a, b, refs = _data()
    res = pairwise_win_rate(prompts, a, b, judge=teacher, references=refs)
    longer = np.array([len(x.split()) > len(y.split()) for x, y in zip(a, b)])
    assert res.win_rate == pytest.approx(longer.mean()) and res.win_rate > 0.7
    assert res.a_longer_share == pytest.approx(longer.mean())
    assert res.position_bias == 0.0
    assert res.lc_stratified == pytest.approx(0.5)
    assert abs(res.lc_win_rate - 0.5) < 0.12, res.lc_win_rate
    assert abs(res.win_rate - 0.5) > 2 * abs(res.lc_win_rate - 0.5)


def test_garbage_verdicts_give_no_win_rate_and_are_reported(server):
    """A judge that never gives a verdict has no win rate (nan), not an even 0.5."""
    handler, teacher = server
    handler.mode = "garbage"
    prompts, a, b, refs = _data(n=10)
    res = pairwise_win_rate(prompts, a, b, judge=teacher, references=refs)
    assert np.isnan(res.win_rate) and np.isnan(res.ci).all() and np.isnan(res.lc_win_rate)
    assert np.isnan(res.lc_stratified) and res.parse_failures == 20 == res.n_judgements
    assert np.isnan(res.position_bias) and res.position_bias_pairs == 0
    assert all(j["verdicts"] == (None, None) and "cannot decide" in j["raw"][0]
               for j in res.judgements)


def test_statistics_match_numpy(server):
    handler, teacher = server
    handler.mode = "mixed"
    prompts, a, b, refs = _data(n=30, seed=1)
    res = pairwise_win_rate(prompts, a, b, judge=teacher, references=refs)
    s_ab, s_ba, same, fails = [], [], [], 0
    for x, y in zip(a, b):
        v1 = parse_verdict(scripted_verdict("mixed", x, y))
        v2 = parse_verdict(scripted_verdict("mixed", y, x))
        fails += (v1 is None) + (v2 is None)
        s_ab.append({"A": 1, "B": 0, None: 0.5}[v1])
        s_ba.append({"A": 0, "B": 1, None: 0.5}[v2])
        if v1 and v2:
            same.append(v1 == v2)
    s_ab, s_ba = np.array(s_ab, float), np.array(s_ba, float)
    pair = (s_ab + s_ba) / 2
    assert 0 < fails < 30 and res.parse_failures == fails
    assert res.win_rate == pytest.approx(pair.mean())
    se = np.sqrt(np.sum((pair - pair.mean()) ** 2) / (len(pair) - 1) / len(pair))
    assert res.stderr == pytest.approx(se)
    assert res.ci == pytest.approx((pair.mean() - 1.96 * se, pair.mean() + 1.96 * se))
    assert res.position_bias == pytest.approx(np.mean(same))
    d = np.array([len(x.split()) - len(y.split()) for x, y in zip(a, b)], float)
    z = np.tanh(d / np.sqrt(np.mean(d ** 2)))
    slope, intercept = np.polyfit(np.r_[z, z], np.r_[s_ab, s_ba], 1)
    assert res.lc_win_rate == pytest.approx(np.clip(intercept, 0, 1))
    assert res.lc_stratified == pytest.approx((pair[d > 0].mean() + pair[d <= 0].mean()) / 2)


def test_matrix_is_antisymmetric_and_uses_principles_template(server):
    handler, teacher = server
    handler.mode, handler.seen[:] = "keyword", []
    prompts = [f"q{i}" for i in range(6)]
    systems = {"good": [f"please report it {i}" for i in range(6)],
               "bad": [f"ignore it {i}" for i in range(6)],
               "also_bad": [f"keep it {i}" for i in range(6)]}
    m = win_rate_matrix(prompts, systems, judge=teacher, template="principles",
                        principles="1. Report gifts.\n2. Be honest.")
    assert len(handler.seen) == 3 * 2 * 6
    assert "1. Report gifts." in handler.seen[0]["messages"][-1]["content"]
    w = m["win_rate"]
    assert m["names"] == list(systems)
    np.testing.assert_allclose(w + w.T, 1.0)
    assert w[0, 1] == w[0, 2] == 1.0
    # "bad" vs "also_bad": the judge always picks slot B, a pure position effect.
    assert w[1, 2] == 0.5 and m["results"][("bad", "also_bad")].position_bias == 1.0
    assert np.all(m["ci_low"] <= w + 1e-12) and np.all(w <= m["ci_high"] + 1e-12)


def test_verdict_parsing_and_template_errors(tmp_path):
    assert parse_verdict("blah [RESULT] B") == "B"
    assert parse_verdict('Format: "[RESULT] A or B".\n...\n[RESULT]: (a)') == "A"
    assert parse_verdict("[RESULT] Response B") == "B"
    assert parse_verdict(" B. ") == "B" and parse_verdict("Response A") == "A"
    assert parse_verdict("B. It cites the code.") == "B" and parse_verdict("(A) is better") == "A"
    assert parse_verdict("A response should cite the code.") is None
    assert parse_verdict("Both A and B are good") is None
    assert parse_verdict("[RESULT] C") is None and parse_verdict(None) is None
    assert load_judge_template("choice").fields >= {"instruction", "reference"}
    with pytest.raises(FileNotFoundError, match="no judge template 'nope'"):
        load_judge_template("nope")
    bad = tmp_path / "bad.txt"
    bad.write_text("Compare {response_a} with {response_b}.")
    with pytest.raises(ValueError, match="instruction"):
        load_judge_template(bad)
    with pytest.raises(ValueError, match="principles="):
        pairwise_win_rate(["q"], ["a"], ["b"], judge=None, template="principles")
    with pytest.raises(ValueError, match="responses 'B': 2 responses for 1 prompts"):
        pairwise_win_rate(["q"], ["a"], ["b", "c"], judge=None)
