"""A deterministic stand-in teacher for SDG tests.

It recognises which default template produced a prompt (by the template text before its
first placeholder) and answers in that template's format. Every answer is a pure function
of (template, prompt, seed, temperature, position in the batch), so a pipeline that sends
different prompt lists or seeds after a resume gets different records: the resume tests
would notice. A fixed share of answers is garbage (refusals, truncated JSON, symbols,
missing sections, copies of the first response) that the pipeline must reject.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time

from align_jax.sdg.templates import load_template

ROLES = ("instruct_questions", "instruct_answer", "values_filter", "preference_pairs",
         "yes_no_question", "yes_no_unfaithful",
         "principle_writer", "aligner_topics", "aligner_questions", "aligner_ethical",
         "aligner_factuality", "aligner_helpful")

VOCAB = """employee manager client supplier gift meal travel invoice record contract
data privacy password laptop badge visitor meeting colleague customer partner vendor
report audit deadline budget expense receipt policy rule safety hazard helmet ladder
warehouse office remote home family friend neighbour conflict interest share stock
market rumour press journalist interview social post photo camera recording consent
complaint harassment bias hiring promotion salary bonus leave sick holiday overtime
schedule shift contractor intern mentor training course exam certificate license
permit inspection regulator government official donation charity volunteer community
environment waste energy water recycling carbon emission vehicle fuel mileage parking
""".split()


def _h(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8],
                          "big")


def _words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(k))


class ScriptedTeacher:
    """Teacher protocol implementation with scripted, seed-dependent outputs."""

    # It writes its scripted text whatever constraint it is given: callers parse it.
    applies_constraints = False

    def __init__(self, *, nex: int = 3, context_length: int = 4096, delay: float = 0.0,
                 garbage: bool = True):
        self.nex = nex
        self.context_length = context_length
        self.delay = delay
        self.garbage = garbage
        self.calls: list[dict] = []
        self._prefixes = {}
        for role in ROLES:
            body = load_template(role).body
            self._prefixes[role] = body[:body.index("{")] if "{" in body else body

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def chat(self, conversations, *, temperature, top_p=1.0, max_tokens, seed=None,
             repetition_penalty=1.0):
        return self.complete([c[-1]["content"] for c in conversations], temperature=temperature,
                             top_p=top_p, max_tokens=max_tokens, seed=seed,
                             repetition_penalty=repetition_penalty)

    def complete(self, prompts, *, temperature, top_p=1.0, max_tokens, seed=None,
                 repetition_penalty=1.0):
        self.calls.append({"n": len(prompts), "temperature": temperature, "seed": seed,
                           "repetition_penalty": repetition_penalty})
        if self.delay:
            time.sleep(self.delay)
        out = []
        for i, prompt in enumerate(prompts):
            role = self.role_of(prompt)
            # Greedy decoding does not depend on the seed; sampling does.
            key = _h(role, prompt, seed if temperature > 0 else "greedy", temperature, i)
            out.append(getattr(self, "_" + role)(prompt, random.Random(key)))
        return out

    def role_of(self, prompt: str) -> str:
        best = max(ROLES, key=lambda r: len(self._prefixes[r]) if prompt.startswith(
            self._prefixes[r]) else -1)
        if not prompt.startswith(self._prefixes[best]):
            raise AssertionError(f"unknown prompt: {prompt[:80]!r}")
        return best

    def _bad(self, rng: random.Random, share: float) -> bool:
        return self.garbage and rng.random() < share

    # -- document stages
    def _instruct_questions(self, prompt, rng):
        if self._bad(rng, 0.1):
            return "I'm sorry, but I cannot write questions about this passage."
        qs = [json.dumps({"question": _words(rng, 9).capitalize() + "?"}) for _ in range(self.nex)]
        style = rng.randrange(4)
        if style == 0 and self.garbage:  # cut off mid-line by max_tokens
            return "\n".join(qs[:-1]) + "\n" + qs[-1][:15]
        if style == 1:
            return "Here are the questions:\n```json\n" + "\n".join(qs) + "\n```\nHope this helps."
        if style == 2:
            return "\n".join(f"{k + 1}. {json.loads(q)['question']}" for k, q in enumerate(qs))
        return "\n".join(qs)

    def _instruct_answer(self, prompt, rng):
        if self._bad(rng, 0.08):
            return ""
        if self._bad(rng, 0.08):
            return "@@ ## 12 %% !! ** 99 && ^^ ~~ ++"
        return "Answer: The context says the " + _words(rng, 12) + "."

    def _values_filter(self, prompt, rng):
        r = rng.random()
        if self.garbage and r < 0.1:
            return "Hmm, it is hard to say."
        if r < 0.3:
            return "No. The passage only gives contact details."
        return "Yes - it sets out rules about " + _words(rng, 3) + "."

    def _preference_pairs(self, prompt, rng):
        lines = []
        for _ in range(self.nex):
            q = _words(rng, 9).capitalize() + "?"
            good = "You should follow the rule on " + _words(rng, 6) + "."
            bad = "Ignore it, nobody checks " + _words(rng, 6) + "."
            if self._bad(rng, 0.1):
                bad = good
            if self._bad(rng, 0.1):
                lines.append(json.dumps({"question": q, "faithful": good}))
                continue
            lines.append(json.dumps({"question": q, "faithful": good, "unfaithful": bad}))
        return "\n".join(lines)

    # -- yes/no stage: the rule's action, taken from the last "Rule:" line of the prompt
    @staticmethod
    def _action(prompt: str) -> str:
        rule = prompt.rsplit("Rule: ", 1)[1].split("\n", 1)[0].rstrip(".")
        rule = re.sub(r"^(?:[Nn]ever|[Dd]o not|You do not have to|If [^,]*,|On [^,]*,)\s*",
                      "", rule)
        return rule[0].lower() + rule[1:]

    def _yes_no_question(self, prompt, rng):
        r = rng.random() if self.garbage else 1.0
        if r < 0.08:
            return " eat a sandwich in the park?"  # off the rule
        if r < 0.12:
            return " " + self._action(prompt) + " and more"  # no question mark
        if r < 0.16:
            return " not " + self._action(prompt) + "?"  # a negation the rule lacks
        return " " + self._action(prompt) + "?\n\nRule: something else"

    def _yes_no_unfaithful(self, prompt, rng):
        r = rng.random() if self.garbage else 1.0
        if r < 0.1:
            return " never " + self._action(prompt) + "."
        if r < 0.15:
            return "\n"
        return " " + self._action(prompt) + ".\nRule: next"

    # -- SAMI
    def _principle_writer(self, prompt, rng):
        m = re.search(r"It should have (\d+) principles: (.*?)\.\n", prompt)
        n = int(m.group(1))
        names = [x.strip() for x in m.group(2).split(",")] if "," in m.group(2) else \
            [f"principle {k}" for k in range(n)]
        lines = ["Sure, here they are:"]
        for name in names[:n]:
            lines.append(json.dumps({"principle": name,
                                     "definition": f"Always be {name} in every answer.",
                                     "antithesis": f"Never be {name} in any answer."}))
        return "\n".join(lines)

    # -- aligner data
    def _aligner_topics(self, prompt, rng):
        known = prompt.split("Topics we already have:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        items = [rng.choice(VOCAB).capitalize() + " " + rng.choice(VOCAB) for _ in range(10)]
        if self.garbage:
            items[0] = known[0]  # a repeat that must be removed
            items[1] = "A topic that is much too long to be a topic"
        return "\n".join(f"{k + 1}. {t}" for k, t in enumerate(items))

    def _aligner_questions(self, prompt, rng):
        hints = prompt.split("Hints:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        out = []
        for hint in hints:
            q_type, topic = hint.split(" | ")
            out.append(json.dumps({"question_type": q_type, "topic": topic,
                                   "question": f"{topic}: " + _words(rng, 8) + "?"}))
        return "\n".join(out)

    def _aligner(self, prompt, rng):
        y = "Whatever, " + _words(rng, 8) + "."
        y2 = "A careful answer: " + _words(rng, 12) + "."
        crit = "The response breaks principle 1. Rewrite it."
        r = rng.random() if self.garbage else 1.0
        if r < 0.1:
            return y + "\nCritique:\nNothing to change.\nAligned response:\n" + y
        if r < 0.2:
            return y + "\nCritique:\n" + crit
        if r < 0.3:
            return (y + "\nCritique:\n" + crit + "\nAligned response:\n" + y2 +
                    " First response: oops")
        return (y + "\nCritique:\n" + crit + "\nAligned response:\n" + y2 +
                "\n\nQuestion:\nA question the teacher invented\nFirst response:\nMore")

    _aligner_ethical = _aligner_factuality = _aligner_helpful = _aligner


class WordTokenizer:
    """encode() over words and punctuation, ids from a growing vocabulary."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(t, len(self.vocab))
                for t in re.findall(r"\w+|[^\w\s]", text)]


class ScriptedServer:
    """`ScriptedTeacher` behind a real OpenAI-compatible HTTP server (chat, completions,
    models, tokenize) on a free local port, with scripted faults.

    Each request carries one prompt and its own seed (as `OpenAITeacher` sends them), and is
    answered as a one-prompt call of the scripted teacher, so a healthy server gives the same
    answers however the client orders or retries its requests.

    Args:
      fail_prompts: every prompt whose hash is 0 modulo this answers HTTP 500, always (a
        request that fails for good); 0: none.
      fail_every: every this-many-th request (counted over all) answers `fail_status`, with
        `Retry-After: retry_after` when given (a transient fault); 0: none.
      junk: answer every prompt with this text instead (None: the scripted answers).
    Attributes:
      url: the base URL (".../v1"); requests, failures: counts so far.
    """

    def __init__(self, *, fail_prompts: int = 0, fail_every: int = 0, fail_status: int = 500,
                 retry_after: str | None = None, model: str = "scripted",
                 context_length: int = 4096, junk: str | None = None):
        import http.server
        import threading

        self.teacher = ScriptedTeacher(context_length=context_length)
        self.fail_prompts, self.fail_every = fail_prompts, fail_every
        self.fail_status, self.retry_after, self.model = fail_status, retry_after, model
        self.junk = junk
        self.requests = self.failures = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                outer._send(self, 200, {"object": "list", "data": [
                    {"id": outer.model, "object": "model", "max_model_len": context_length}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, headers = outer._answer(self.path, body)
                outer._send(self, status, payload, headers)

            def log_message(self, *args):
                pass

        self._srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._srv.server_address[1]}/v1"

    @staticmethod
    def _send(handler, status, payload, headers=None):
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)

    def _answer(self, path, body):
        if path.endswith("/tokenize"):
            return 200, {"count": self.teacher.count_tokens(body["prompt"])}, None
        chat = path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        with self._lock:
            self.requests += 1
            transient = self.fail_every and self.requests % self.fail_every == 0
        if transient or (self.fail_prompts and _h(prompt) % self.fail_prompts == 0):
            with self._lock:
                self.failures += 1
            status = self.fail_status if transient else 500
            headers = {"Retry-After": self.retry_after} if transient and self.retry_after \
                else None
            return status, {"error": {"message": "scripted fault"}}, headers
        text, = [self.junk] if self.junk is not None else self.teacher.complete(
            [prompt], temperature=body.get("temperature", 0.0), top_p=body.get("top_p", 1.0),
            max_tokens=body["max_tokens"], seed=body.get("seed"))
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat else
                  {"index": 0, "text": text, "logprobs": None})
        return 200, {"id": "x", "object": "chat.completion" if chat else "text_completion",
                     "created": 0, "model": self.model,
                     "choices": [{**choice, "finish_reason": "stop"}]}, None

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
