"""Teachers with constraints: `local:` enforces them on the device, `openai:` sends them as
structured-output fields (our own server accepts them all) and falls back to free text on a
server that refuses them."""

import http.server
import json
import threading

import jax
import jsonschema
import pytest

from align_jax.generate import constraints as C
from align_jax.generate import server
from align_jax.models.config import get_config
from align_jax.models.hf import save_hf
from align_jax.models.transformer import init_params
from align_jax.sdg.backends import OpenAITeacher, make_teacher
from align_jax.sdg.teacher import ask
from align_jax.tokenizer_training import train_tokenizer

TEXT = ["Workers keep records honest and report gifts from suppliers to the office.",
        "A values document asks for care, fairness and respect: yes or no?",
        'Questions and answers are written as {"question": "...", "answer": "yes"}.']
PROMPTS = ["Is honesty kept?", "Do we report gifts?", "Write a question."]
SCHEMA = {"type": "object", "properties": {
    "question": {"type": "string", "maxLength": 30}, "answer": {"enum": ["yes", "no"]}},
    "required": ["question", "answer"], "additionalProperties": False}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tok = train_tokenizer(TEXT * 10, path, vocab_size=330)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=192, init_std=0.3,
                     tie_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    save_hf(cfg, init_params(cfg, jax.random.key(2)), str(path))
    srv = server.ServerThread(server.app_from_checkpoint(str(path), model_name="t",
                                                         batch_window_s=0.02))
    remote = make_teacher(f"openai:{srv.url}", concurrency=3, timeout=300)
    local = make_teacher(f"local:{path}")
    yield local, remote
    remote.close()
    srv.stop()


def _valid(text):
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, seed=4)])
def test_local_and_openai_teachers_apply_the_same_constraints(teachers, kw):
    local, remote = teachers
    c = C.json_schema(SCHEMA)
    a = ask(local, PROMPTS, max_tokens=80, constraint=c, **kw)
    b = ask(remote, PROMPTS, max_tokens=80, constraint=c, **kw)
    assert local.applies_constraints and remote.applies_constraints
    assert a == b  # same seeds, same device-side automaton
    for text, incomplete in zip(a, local.last_incomplete):
        assert incomplete or _valid(text), text
    assert not all(local.last_incomplete)
    per = [C.choice(["yes", "no"]), C.regex("[0-9]{2}-[a-z]{2}"), None]
    a = local.complete(PROMPTS, max_tokens=24, constraint=per, **kw)
    assert a == remote.complete(PROMPTS, max_tokens=24, constraint=per, **kw)
    assert a[0] in ("yes", "no") and per[1].validate(a[1])


class _Strict(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible double that, like the OpenAI API, refuses fields it does not know."""

    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        unknown = [k for k in ("response_format", "structured_outputs", "guided_json",
                               "guided_choice", "guided_regex") if k in body]
        if unknown:
            status, payload = 400, {"error": {
                "message": f"Unrecognized request argument supplied: {unknown[0]}",
                "type": "invalid_request_error", "param": None, "code": None}}
        else:
            status, payload = 200, {
                "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": 'Sure: {"answer": "yes"}'}}]}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def strict():
    handler = type("Handler", (_Strict,), {"seen": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    teacher = OpenAITeacher(f"http://127.0.0.1:{srv.server_address[1]}/v1", model="m",
                            context_length=64, max_retries=0)
    yield handler, teacher
    teacher.close()
    srv.shutdown()
    srv.server_close()


def test_a_server_that_refuses_the_fields_gets_free_text_and_the_flag_drops(strict, caplog):
    handler, teacher = strict
    assert teacher.applies_constraints
    out = teacher.chat([[{"role": "user", "content": "?"}]], temperature=0.0, max_tokens=8,
                       constraint=C.json_schema(SCHEMA))
    assert out == ['Sure: {"answer": "yes"}'] and not teacher.applies_constraints
    tried = [sorted(set(b) - {"model", "messages", "max_tokens", "temperature", "top_p", "seed"})
             for b in handler.seen]
    assert tried == [["response_format"], ["structured_outputs"], ["guided_json"], []]
    assert handler.seen[0]["response_format"]["json_schema"]["schema"] == SCHEMA
    assert any("sending them unconstrained" in r.message for r in caplog.records)
    # From then on the refused forms are not tried again.
    handler.seen.clear()
    teacher.chat([[{"role": "user", "content": "?"}]] * 2, temperature=0.0, max_tokens=8,
                 constraint=C.choice(["yes", "no"]))
    assert [set(b) & {"structured_outputs", "guided_choice"} for b in handler.seen][-1] == set()
    assert len([b for b in handler.seen if "guided_choice" in b]) <= 2


def test_ask_sends_no_constraint_argument_when_there_is_none():
    class Old:  # a teacher written before constraints existed
        context_length = 64

        def complete(self, prompts, *, temperature, top_p=1.0, max_tokens, seed=None):
            return ["x"] * len(prompts)

    assert ask(Old(), ["a", "b"], use_chat=False, temperature=0.0, max_tokens=2) == ["x", "x"]
