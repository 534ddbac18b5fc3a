"""Teacher backends: `local:` and `openai:` agree on one checkpoint; failures are retried and
reported clearly."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from align_jax.generate import server
from align_jax.models.config import get_config
from align_jax.models.hf import save_hf
from align_jax.models.transformer import init_params
from align_jax.sdg import backends
from align_jax.sdg.backends import LocalTeacher, OpenAITeacher, TeacherError, make_teacher
from align_jax.sdg.teacher import Teacher, ask
from align_jax.tokenizer_training import train_tokenizer

TEXT = ["Workers keep records honest and report gifts from suppliers to the office.",
        "A values document asks for care, fairness and respect in every meeting.",
        "Questions and answers are written from each chunk of the policy text."]
PROMPTS = ["Workers keep", "A values document asks", "Questions and"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An HF checkpoint dir (weights + tokenizer files) of a tiny random model."""
    path = tmp_path_factory.mktemp("teacher")
    tok = train_tokenizer(TEXT * 10, path, vocab_size=320)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=128, init_std=0.3,
                     tie_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    params = init_params(cfg, jax.random.key(1))
    # Keep specials and byte pieces out of greedy answers so texts are readable strings.
    quiet = [i for i in range(263) if i != tok.eos_id]
    params["lm_head"] = params["lm_head"].at[:, np.asarray(quiet)].set(0.0)
    save_hf(cfg, params, str(path))
    return str(path)


@pytest.fixture(scope="module")
def teachers(checkpoint):
    app = server.app_from_checkpoint(checkpoint, model_name="tiny-teacher",
                                     batch_window_s=0.02)
    srv = server.ServerThread(app)
    remote = make_teacher(f"openai:{srv.url}", concurrency=3, timeout=120)
    local = make_teacher(f"local:{checkpoint}")
    yield local, remote
    remote.close()
    srv.stop()


def test_both_backends_are_teachers(teachers):
    local, remote = teachers
    assert isinstance(local, LocalTeacher) and isinstance(remote, OpenAITeacher)
    assert isinstance(local, Teacher) and isinstance(remote, Teacher)
    assert remote.base_url.endswith("/v1") and remote.model == "tiny-teacher"
    assert local.context_length == remote.context_length == 128
    for text in TEXT + ["", "ünïcode ✓"]:
        assert remote.count_tokens(text) == local.count_tokens(text)


def test_local_and_openai_backends_give_the_same_greedy_text(teachers):
    local, remote = teachers
    kw = dict(temperature=0.0, max_tokens=16)
    a, b = local.complete(PROMPTS, **kw), remote.complete(PROMPTS, **kw)
    assert a == b and len(a) == 3 and any(t.strip() for t in a)
    a, b = ask(local, PROMPTS, **kw), ask(remote, PROMPTS, **kw)
    assert a == b and any(t.strip() for t in a)


def test_local_and_openai_backends_draw_the_same_seeded_samples(teachers):
    local, remote = teachers
    kw = dict(temperature=1.0, top_p=0.9, max_tokens=16)
    a = local.complete(PROMPTS, seed=5, **kw)
    assert remote.complete(PROMPTS, seed=5, **kw) == a
    assert local.complete(PROMPTS, seed=6, **kw) != a


def test_local_teacher_buckets_batches_up_to_its_batch_size(teachers, checkpoint, monkeypatch):
    local, _ = teachers
    capped = make_teacher(f"local:{checkpoint}", batch_size=4, shape_budget=16)
    seen = []
    real = backends.generate
    monkeypatch.setattr(backends, "generate",
                        lambda *a, **kw: seen.append(kw["batch_size"]) or real(*a, **kw))
    kw = dict(temperature=0.0, max_tokens=8)
    for n in (1, 3, 2, 6):
        prompts = (PROMPTS * 2)[:n]
        # Bucketing changes the padding only: the greedy texts equal an unbucketed teacher's.
        assert capped.complete(prompts, **kw) == local.complete(prompts, **kw)
    # Rows per compiled batch: the next power of two, at most batch_size (None: unbucketed).
    assert seen == [1, None, 4, None, 2, None, 4, None]


def test_make_teacher_rejects_bad_specs(tmp_path):
    for spec in ("local", "gpt:x", "openai:", "openai:not-a-url"):
        with pytest.raises(ValueError, match="spec|URL"):
            make_teacher(spec)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        make_teacher(f"local:{tmp_path / 'missing'}")


@pytest.fixture
def new_teacher():
    """OpenAITeacher(...) that is closed after the test."""
    made = []

    def make(*args, **kwargs):
        made.append(OpenAITeacher(*args, **kwargs))
        return made[-1]

    yield make
    for teacher in made:
        teacher.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_server_fails_clearly_after_retries(new_teacher):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    teacher = new_teacher(url, model="m", max_retries=2, backoff=0.01, timeout=2)
    t0 = time.monotonic()
    with pytest.raises(TeacherError) as e:
        teacher.complete(["hello"], temperature=0.0, max_tokens=4)
    msg = str(e.value)
    assert url in msg and "after 3 attempts" in msg and "cannot connect" in msg
    assert "\n" not in msg and time.monotonic() - t0 < 10


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers POSTs from a script of (status, content type, body); the last one repeats."""

    script: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        status, ctype, payload, *headers = self.script[min(len(self.seen) - 1,
                                                           len(self.script) - 1)]
        if status == "hang":
            time.sleep(float(payload))
            status, ctype, payload = 200, "application/json", GOOD
        data = payload.encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers[0] if headers else {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left, as the timeout test intends

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    handler = type("Handler", (_Scripted,), {"script": [], "seen": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


GOOD = json.dumps({"id": "x", "object": "text_completion", "created": 0, "model": "m",
                   "choices": [{"index": 0, "text": " fine", "finish_reason": "stop",
                                "logprobs": None}]})


def test_garbage_then_good_answer_is_retried(new_teacher, scripted):
    handler, url = scripted
    handler.script = [(500, "application/json", '{"error": {"message": "boom"}}'),
                      (200, "text/html", "<html>proxy says hi</html>"),
                      (200, "application/json", '{"object": "text_completion"}'),
                      (200, "application/json", GOOD)]
    teacher = new_teacher(url, model="m", max_retries=3, backoff=0.01, context_length=64)
    assert teacher.complete(["hi"], temperature=0.0, max_tokens=4, seed=3) == [" fine"]
    assert len(handler.seen) == 4
    assert handler.seen[-1]["seed"] == 3 and handler.seen[-1]["max_tokens"] == 4


@pytest.mark.parametrize("status,ctype,payload,needle", [
    (200, "text/plain", "definitely not json", "not JSON"),
    (200, "application/json", '{"choices": []}', "no choices"),
    (503, "application/json", '{"error": {"message": "overloaded"}}', "HTTP 503"),
    (200, "application/json", '{"choices": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "unusable answer"),
])
def test_persistent_garbage_fails_clearly(new_teacher, scripted, status, ctype, payload, needle):
    handler, url = scripted
    handler.script = [(status, ctype, payload)]
    teacher = new_teacher(url, model="m", max_retries=2, backoff=0.01)
    with pytest.raises(TeacherError) as e:
        teacher.chat([[{"role": "user", "content": "hi"}]], temperature=0.0, max_tokens=4)
    assert url in str(e.value) and needle in str(e.value) and "after 3 attempts" in str(e.value)
    assert len(handler.seen) == 3


def test_slow_server_times_out_then_fails_clearly(new_teacher, scripted):
    handler, url = scripted
    handler.script = [("hang", None, "1.5")]
    teacher = new_teacher(url, model="m", max_retries=1, backoff=0.01, timeout=0.3)
    with pytest.raises(TeacherError, match=r"after 2 attempts: no answer within the 0.3 s"):
        teacher.complete(["hi"], temperature=0.0, max_tokens=4)
    assert len(handler.seen) == 2


def test_retry_after_is_honoured_up_to_max_backoff(new_teacher, scripted):
    handler, url = scripted
    busy = '{"error": {"message": "busy"}}'
    handler.script = [(503, "application/json", busy, {"Retry-After": "0.6"}),
                      (429, "application/json", busy, {"Retry-After": "3600"}),
                      (200, "application/json", GOOD)]
    teacher = new_teacher(url, model="m", max_retries=3, backoff=0.001, max_backoff=1.0)
    t0 = time.monotonic()
    assert teacher.complete(["hi"], temperature=0.0, max_tokens=4) == [" fine"]
    # 0.6 s as asked, then an hour asked but max_backoff (1 s) waited; the exponential
    # backoff alone would have waited a few milliseconds.
    assert 1.6 <= time.monotonic() - t0 < 10 and len(handler.seen) == 3


def test_client_errors_are_not_retried(new_teacher, scripted):
    handler, url = scripted
    handler.script = [(401, "application/json", '{"error": {"message": "bad key"}}')]
    teacher = new_teacher(url, model="m", max_retries=3, backoff=0.01)
    with pytest.raises(TeacherError, match="HTTP 401"):
        teacher.complete(["hi"], temperature=0.0, max_tokens=4)
    assert len(handler.seen) == 1


def test_count_tokens_falls_back_to_an_estimate(new_teacher, scripted):
    handler, url = scripted
    handler.script = [(404, "application/json", '{"error": {"message": "no such route"}}')]
    teacher = new_teacher(url, model="m", context_length=64)
    assert teacher.count_tokens("abcdef") == 2 and teacher.count_tokens("é" * 3) == 2
    assert len(handler.seen) == 1  # asked once, then remembered


@pytest.mark.slow
def test_align_jax_serve_cli_entry(checkpoint, teachers, tmp_path, new_teacher):
    """`align-jax serve` through the real CLI: gin-configured, key-guarded, clean shutdown."""
    port, out_dir = _closed_port(), tmp_path / "run"
    gin_file = tmp_path / "serve.gin"
    gin_file.write_text(
        "from __gin__ import dynamic_registration\n"
        "from align_jax.generate import server\n"
        f"server.serve_main.model_dir = {checkpoint!r}\n"
        f"server.serve_main.port = {port}\n"
        "server.serve_main.log_level = 'warning'\n")
    cmd = [sys.executable, "-m", "align_jax.cli", "serve", f"--gin_file={gin_file}",
           f"--output_dir={out_dir}", "--gin_param=server.serve_main.api_key = 'sesame'"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        teacher = new_teacher(f"http://127.0.0.1:{port}", api_key="sesame", timeout=120)
        got = teacher.complete(PROMPTS[:1], temperature=0.0, max_tokens=8)
        assert got == teachers[0].complete(PROMPTS[:1], temperature=0.0, max_tokens=8)
        with pytest.raises(TeacherError, match="HTTP 401"):
            new_teacher(f"http://127.0.0.1:{port}", api_key="wrong", model="m").complete(
                ["x"], temperature=0.0, max_tokens=2)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert (out_dir / "run_info.json").exists() and (out_dir / "operative_config.gin").exists()
