"""Teacher backends: a local checkpoint through align_jax.generate, or any OpenAI-compatible
server (vLLM, TGI, llama.cpp, `align-jax serve`, the OpenAI API).

`make_teacher("local:<HF checkpoint dir>")` or `make_teacher("openai:<base URL>")`.

Seeds: prompt i of a call with `seed` is sampled with `row_seed(seed, i)` by both backends
(the OpenAI backend sends it as the seed of prompt i's request, and `align-jax serve` uses a
single-prompt request's seed as is), so against `align-jax serve` on the same checkpoint the
two backends return the same completions, sampled ones included.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import email.utils
import json
import logging
import math
import os
import random
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence

import httpx
import jax.numpy as jnp
import openai

from align_jax.generate import constraints as constraints_lib
from align_jax.generate import continuous
from align_jax.generate.loop import generate
from align_jax.generate.prompt_batches import next_pow2
from align_jax.generate.sampling import row_seed
from align_jax.models.hf import load_hf
from align_jax.models.named import resolve_model_path
from align_jax.sdg.teacher import PartialTeacherError, TeacherError
from align_jax.tokenizer import encode_prompt, load_tokenizer

log = logging.getLogger(__name__)

# Keys that OpenAI-compatible servers use for the context length in /v1/models entries.
_CONTEXT_KEYS = ("max_model_len", "context_length", "context_window", "max_context_length")
# Bytes per token assumed when the server cannot count tokens: fewer than real tokenizers
# average on prose, so the estimate errs on the long side and chunks stay within context.
_BYTES_PER_TOKEN = 3


class LocalTeacher:
    """A teacher that runs a checkpoint on the local devices with `align_jax.generate`.

    Attributes:
      context_length: prompt + completion tokens the cache holds (max_len).
      applies_constraints: True: constraints are enforced on the device (align_jax.generate).
      last_incomplete: after a call with a constraint, for each prompt whether its
        completion ended (max_tokens) before the constraint was satisfied; else None.
    """

    applies_constraints = True

    def __init__(self, model: str | os.PathLike | tuple, *, max_len: int | None = None,
                 batch_size: int | None = None, dtype: str = "float32", mesh=None,
                 rules: str = "fsdp", tokenizer=None, shape_budget: int | None = None,
                 rows: int | None = None):
        """Args:
          model: a Hugging Face checkpoint dir with tokenizer files, or (config, params,
            tokenizer).
          max_len: context length; default the config's max_position.
          batch_size: the most rows per compiled batch (see `generate`); a call with fewer
            prompts runs at the next power of two, so the compiled shapes are the powers of
            two up to batch_size and a one-prompt call does not pay for a full batch.
          dtype: parameter dtype when loading a dir.
          mesh, rules: shard the model (see `generate`).
          tokenizer: a tokenizer dir to use instead of the checkpoint's own.
          shape_budget: the token budget every call is compiled for (each call still stops
            at its own max_tokens), so stages with different budgets share one compiled
            prefill and decode; default: max_tokens rounded up to a power of two (>= 64).
          rows: continuous batching (`align_jax.generate.continuous`): calls without a
            constraint stream their prompts through this many fixed decode rows of max_len
            slots each, a finished row taking the next prompt at once (one device; the
            cache holds rows x max_len tokens). None: every call is one `generate`.
        """
        if isinstance(model, (str, os.PathLike)):
            self.name = os.fspath(model)
            self.config, self.params = load_hf(self.name, dtype=jnp.dtype(dtype), mesh=mesh,
                                               rules=rules)
            self.tokenizer = load_tokenizer(tokenizer or resolve_model_path(self.name))
        else:
            if len(model) != 3:
                raise TypeError("LocalTeacher(model): give a checkpoint dir or a "
                                "(config, params, tokenizer) tuple")
            self.config, self.params, self.tokenizer = model
            self.name = "<in-memory model>"
        self.context_length = int(max_len or self.config.max_position)
        self.batch_size, self.mesh, self.rules = batch_size, mesh, rules
        self.shape_budget = shape_budget
        self.last_incomplete: list[bool] | None = None
        self.engine = None
        if rows is not None:
            if mesh is not None:
                raise ValueError("local teacher: rows= (continuous batching) runs on one "
                                 "device; leave out mesh or rows")
            self.engine = continuous.Engine(
                self.config, self.params, self.tokenizer,
                engine=continuous.EngineConfig(rows=int(rows), max_len=self.context_length))

    @property
    def identity(self) -> dict:
        """What the SDG store records to tell this teacher from another."""
        return {"backend": "local", "model": self.name}

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the checkpoint's tokenizer (no special tokens)."""
        return len(self.tokenizer.encode(text))

    def complete(self, prompts: list[str], *, temperature: float, top_p: float = 1.0,
                 max_tokens: int, seed: int | None = None,
                 repetition_penalty: float = 1.0, constraint=None) -> list[str]:
        """Continues raw prompts (BOS prepended when the tokenizer has one); see `Teacher`."""
        return self._run([encode_prompt(self.tokenizer, p, chat_template=False)
                          for p in prompts],
                         temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                         repetition_penalty=repetition_penalty, constraint=constraint)

    def chat(self, conversations: list[list[dict]], *, temperature: float, top_p: float = 1.0,
             max_tokens: int, seed: int | None = None,
             repetition_penalty: float = 1.0, constraint=None) -> list[str]:
        """Answers conversations through the tokenizer's chat template; see `Teacher`."""
        try:
            ids = [encode_prompt(self.tokenizer, c) for c in conversations]
        except (ValueError, TypeError) as e:
            raise ValueError(f"local teacher {self.name}: {e}") from e
        return self._run(ids, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                         seed=seed, repetition_penalty=repetition_penalty,
                         constraint=constraint)

    def _run(self, ids, *, temperature, top_p, max_tokens, seed,
             repetition_penalty=1.0, constraint=None) -> list[str]:
        self.last_incomplete = None
        if not ids:
            return []
        base = seed if seed is not None else secrets.randbits(32)
        if self.engine is not None and constraint is None:
            try:
                out = continuous.generate_rows(
                    self.engine, ids, max_new_tokens=max_tokens,
                    settings=dict(temperature=temperature, top_p=top_p,
                                  repetition_penalty=repetition_penalty),
                    seeds=[row_seed(base, i) for i in range(len(ids))])
            except ValueError as e:
                raise ValueError(f"local teacher {self.name}: {e}") from e
            return [c.text for c in out]
        budget = self.shape_budget
        if budget is None or budget < max_tokens:
            budget = max(64, next_pow2(max_tokens))
        batch_size = self.batch_size and min(self.batch_size, next_pow2(len(ids)))
        try:
            out = generate(self.config, self.params, ids, max_new_tokens=max_tokens,
                           temperature=temperature, top_p=top_p, tokenizer=self.tokenizer,
                           repetition_penalty=repetition_penalty,
                           seeds=[row_seed(base, i) for i in range(len(ids))],
                           max_len=self.context_length, batch_size=batch_size,
                           mesh=self.mesh, rules=self.rules, shape_budget=budget,
                           constraint=constraint)
        except ValueError as e:
            raise ValueError(f"local teacher {self.name}: {e}") from e
        self.last_incomplete = out.incomplete
        return list(out.texts)


class _Garbage(Exception):
    """The server answered, but not with a usable completion."""


class OpenAITeacher:
    """A teacher behind any OpenAI-compatible HTTP endpoint, via the official client.

    One request per prompt, at most `concurrency` in flight (a thread pool); each request
    is retried with exponential backoff and jitter on connection errors, timeouts, 408/429/5xx
    and unusable answers (non-JSON, no choices), then fails with a one-line `TeacherError`
    naming the URL. Other 4xx answers fail at once. A call whose prompts partly fail raises
    `PartialTeacherError` carrying the completions that were answered, so SDG gives up only
    the work units of the failed prompts.

    Structured output: a json_schema constraint is sent as OpenAI's response_format
    (json_schema, strict), a choice or regex as vLLM's structured_outputs; a server that
    refuses a field (HTTP 400/422 naming it) is asked with the next form (vLLM's older
    guided_json / guided_choice / guided_regex), and once every form is refused the request
    goes out unconstrained, one warning is logged and `applies_constraints` turns False.

    Attributes:
      base_url, model: where requests go and the model id sent with them.
      context_length: given, or read from the server's /v1/models entry (max_model_len).
      applies_constraints: True until the server refused a constraint (see above).
    """

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 30.0,
                 context_length: int | None = None, tokenizer=None):
        """Args:
          base_url: e.g. http://127.0.0.1:8000/v1 (a URL with no path gets /v1 appended).
          model: model id; default the first one the server lists.
          api_key: bearer token; default $OPENAI_API_KEY, else a placeholder.
          concurrency: requests in flight at once.
          timeout: seconds per request attempt.
          max_retries: retries after the first attempt (the retry budget of each request:
            connection errors, timeouts, 408/429/5xx and unusable answers).
          backoff, max_backoff: the n-th retry waits backoff * 2**n times a random factor in
            [0.5, 1.5), or longer when a 429/503 answer's Retry-After asks for it, never more
            than max_backoff.
          context_length: the server's context; read from /v1/models when None.
          tokenizer: a local tokenizer (dir or Tokenizer) matching the server's model, for exact
            `count_tokens`; otherwise the server's /tokenize (vLLM, align-jax serve) is asked,
            and failing that the count is estimated from the text's UTF-8 length.
        """
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"openai teacher: base URL must look like http://host:port/v1, "
                             f"got {base_url!r}")
        if parsed.path in ("", "/"):
            base_url = base_url.rstrip("/") + "/v1"
        self.base_url = base_url.rstrip("/")
        self._root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self._model = model
        self._context_length = context_length
        self.concurrency, self.timeout = max(1, int(concurrency)), float(timeout)
        self.max_retries, self.backoff, self.max_backoff = (
            max(0, int(max_retries)), float(backoff), float(max_backoff))
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        # Retries are ours (they also cover garbage answers), so the client's are off.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout,
                                     max_retries=0)
        self._http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"})
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self._tokenizer = tokenizer
        self._remote_count = True
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.applies_constraints = True
        self._refused: set[str] = set()  # request fields this server refused

    # -- protocol -------------------------------------------------------------------------

    @property
    def model(self) -> str:
        if self._model is None:
            self._read_models()
        return self._model

    @property
    def identity(self) -> dict:
        """What the SDG store records to tell this teacher from another."""
        return {"backend": "openai", "base_url": self.base_url, "model": self.model}

    @property
    def context_length(self) -> int:
        if self._context_length is None:
            self._read_models()
            if self._context_length is None:
                raise TeacherError(f"openai teacher {self.base_url}: /v1/models does not say "
                                   f"the context length; pass context_length=")
        return self._context_length

    def count_tokens(self, text: str) -> int:
        """Tokens of `text`: local tokenizer, else the server's /tokenize, else an estimate."""
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text))
        if self._remote_count:
            try:
                r = self._http.post(f"{self._root}/tokenize", json={
                    "model": self.model, "prompt": text, "add_special_tokens": False})
                if r.status_code == 200:
                    data = r.json()
                    if isinstance(data.get("count"), int):
                        return data["count"]
                    if isinstance(data.get("tokens"), list):
                        return len(data["tokens"])
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            self._remote_count = False
            log.warning("openai teacher %s: no usable /tokenize; estimating token counts as "
                        "UTF-8 bytes / %d (pass tokenizer= for exact counts)", self.base_url,
                        _BYTES_PER_TOKEN)
        return math.ceil(len(text.encode("utf-8")) / _BYTES_PER_TOKEN)

    def complete(self, prompts: list[str], *, temperature: float, top_p: float = 1.0,
                 max_tokens: int, seed: int | None = None,
                 repetition_penalty: float = 1.0, constraint=None) -> list[str]:
        """Continues raw prompts with /v1/completions; see `Teacher`."""
        extra = _extra_body(repetition_penalty) or {}
        per = constraints_lib.per_prompt(constraint, len(prompts)) or [None] * len(prompts)

        def one(i, prompt):
            return self._constrained(per[i], lambda fields: _text(
                self._client.completions.create(
                    model=self.model, prompt=prompt, max_tokens=max_tokens,
                    temperature=temperature, top_p=top_p,
                    seed=None if seed is None else row_seed(seed, i),
                    extra_body={**extra, **fields} or None), chat=False))
        return self._map(one, prompts)

    def chat(self, conversations: list[list[dict]], *, temperature: float, top_p: float = 1.0,
             max_tokens: int, seed: int | None = None,
             repetition_penalty: float = 1.0, constraint=None) -> list[str]:
        """Answers conversations with /v1/chat/completions; see `Teacher`."""
        extra = _extra_body(repetition_penalty) or {}
        per = constraints_lib.per_prompt(constraint, len(conversations)) or \
            [None] * len(conversations)

        def one(i, messages):
            return self._constrained(per[i], lambda fields: _text(
                self._client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens,
                    temperature=temperature, top_p=top_p,
                    seed=None if seed is None else row_seed(seed, i),
                    extra_body={**extra, **fields} or None), chat=True))
        return self._map(one, conversations)

    def _constrained(self, constraint, send: Callable[[dict], str]) -> str:
        """send(fields) with the first form of `constraint` the server has not refused;
        unconstrained once every form was refused."""
        for field, body in _constraint_forms(constraint):
            if field in self._refused:
                continue
            try:
                return send(body)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                if not _names_field(e, field):
                    raise
                with self._lock:
                    first = field not in self._refused
                    self._refused.add(field)
                if first:
                    log.warning("openai teacher %s: the server refused '%s' (%s)", self.base_url,
                                field, _brief(e.message))
        if constraint is not None:
            with self._lock:
                if self.applies_constraints:
                    log.warning("openai teacher %s: the server accepts no structured-output "
                                "field for %s constraints; sending them unconstrained from now "
                                "on (callers parse the texts tolerantly)", self.base_url,
                                constraint.kind)
                self.applies_constraints = False
        return send({})

    def close(self) -> None:
        """Stops the worker threads and closes the HTTP connections."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._client.close()
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    def _read_models(self) -> None:
        def ask():
            page = self._client.models.list()
            data = getattr(page, "data", None)
            if not isinstance(data, list) or not data or not getattr(data[0], "id", None):
                raise _Garbage("/v1/models lists no models")
            return data
        data = self._retrying(ask, what="/v1/models")
        entry = data[0]
        if self._model is None:
            self._model = entry.id
        else:
            entry = next((m for m in data if getattr(m, "id", None) == self._model), entry)
        if self._context_length is None:
            extra = getattr(entry, "model_extra", None) or {}
            for key in _CONTEXT_KEYS:
                if isinstance(extra.get(key), int):
                    self._context_length = extra[key]
                    break

    def _map(self, fn: Callable, items: Sequence) -> list[str]:
        if not items:
            return []
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.concurrency, thread_name_prefix="openai-teacher")
        self.model  # noqa: B018 - resolve the model id once, before the fan-out
        futures = [self._pool.submit(self._retrying, fn, i, x, what=f"request {i}")
                   for i, x in enumerate(items)]
        # Every request runs to its end (answer or retries spent): a prompt that fails costs
        # only its own completion, which the caller (SDG: its work unit) gives up.
        concurrent.futures.wait(futures)
        failures = {i: f.exception() for i, f in enumerate(futures) if f.exception() is not None}
        if failures:
            first = next(iter(failures.values()))
            if not isinstance(first, TeacherError):
                raise first
            raise PartialTeacherError(
                f"{first} ({len(failures)} of {len(items)} prompts of the call failed)"
                if len(items) > 1 else str(first),
                completions=[None if i in failures else f.result()
                             for i, f in enumerate(futures)],
                failures={i: str(e) for i, e in failures.items()})
        return [f.result() for f in futures]

    def _retrying(self, fn: Callable, *args, what: str):
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            wait = None
            try:
                return fn(*args)
            except openai.APIStatusError as e:
                if e.status_code not in (408, 429) and e.status_code < 500:
                    raise TeacherError(f"openai teacher {self.base_url}: {what} refused with "
                                       f"HTTP {e.status_code}: {_brief(e.message)}") from None
                reason = f"HTTP {e.status_code}: {_brief(e.message)}"
                wait = retry_after(getattr(e, "response", None))
            except openai.APITimeoutError:
                reason = f"no answer within the {self.timeout:g} s timeout"
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e
                reason = f"cannot connect ({type(cause).__name__}: {_brief(str(cause))})"
            except (_Garbage, openai.APIResponseValidationError, RecursionError) as e:
                # RecursionError: a response body nested too deeply for the JSON decoder.
                reason = f"unusable answer ({_brief(str(e))})"
            if attempt + 1 < attempts:
                delay = self.backoff * 2**attempt * random.uniform(0.5, 1.5)
                # A server that says when to come back is believed (up to max_backoff).
                time.sleep(min(self.max_backoff, delay if wait is None else max(wait, delay)))
        raise TeacherError(f"openai teacher {self.base_url}: {what} failed after {attempts} "
                           f"attempts: {reason}")


def retry_after(response) -> float | None:
    """Seconds a 429/503 answer's Retry-After header asks to wait (delta or HTTP date)."""
    headers = getattr(response, "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _extra_body(repetition_penalty: float) -> dict | None:
    """repetition_penalty is not an OpenAI field; vLLM, TGI, llama.cpp and align-jax serve read
    it from the request body. 1.0 (off) is not sent, so strict OpenAI servers still work."""
    return None if repetition_penalty == 1.0 else {"repetition_penalty": repetition_penalty}


def _constraint_forms(constraint) -> list[tuple[str, dict]]:
    """The request fields that carry `constraint`, in the order they are tried."""
    if constraint is None:
        return []
    if constraint.kind == "json_schema":
        schema = json.loads(constraint.payload)
        return [("response_format", {"response_format": {"type": "json_schema", "json_schema": {
                    "name": "output", "schema": schema, "strict": True}}}),
                ("structured_outputs", {"structured_outputs": {"json": schema}}),
                ("guided_json", {"guided_json": schema})]
    value = constraint.payload
    if constraint.kind == "choice":
        value = json.loads(value)
    return [("structured_outputs", {"structured_outputs": {constraint.kind: value}}),
            (f"guided_{constraint.kind}", {f"guided_{constraint.kind}": value})]


# Phrases of servers that reject a request field they do not know (pydantic, serde, OpenAI).
_REFUSALS = ("unknown field", "unrecognized", "extra inputs", "extra_forbidden",
             "not supported", "unsupported", "not permitted", "invalid parameter")


def _names_field(e: openai.APIStatusError, field: str) -> bool:
    """Whether an HTTP 400/422 says that the request field `field` is not accepted."""
    text = f"{e.message} {e.body}".lower()
    return field.lower() in text and any(p in text for p in _REFUSALS)


def _brief(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


def _text(response, *, chat: bool) -> str:
    """The completion text of a response, or _Garbage when it has none."""
    if isinstance(response, (str, bytes)):  # the client hands back non-JSON bodies as text
        raise _Garbage(f"not JSON: {_brief(response if isinstance(response, str) else '')!r}")
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Garbage("no choices in the response")
    choice = choices[0]
    text = getattr(getattr(choice, "message", None), "content", None) if chat else \
        getattr(choice, "text", None)
    if text is None and chat:
        text = ""  # e.g. a refusal or tool call: no text, but a well-formed answer
    if not isinstance(text, str):
        raise _Garbage(f"choice has no {'message content' if chat else 'text'}")
    return text


_HTTP_ONLY = frozenset({"api_key", "concurrency", "timeout", "max_retries", "backoff",
                        "max_backoff", "model", "context_length"})


def make_teacher(spec: str, **kwargs):
    """Builds a teacher from "local:<HF checkpoint dir>" or "openai:<base URL>".

    Args:
      spec: the backend and its target.
      **kwargs: passed to `LocalTeacher` or `OpenAITeacher` (the HTTP-only options are
        dropped for `local:`).
    Returns:
      A `Teacher`.
    """
    kind, sep, target = str(spec).partition(":")
    if not sep or not target:
        raise ValueError(f"teacher spec {spec!r}: expected 'local:<HF checkpoint dir>' or "
                         f"'openai:<base URL>'")
    if kind == "local":
        target = resolve_model_path(target)  # a named default or a .gguf file
        if not os.path.isdir(target):
            raise FileNotFoundError(f"teacher spec {spec!r}: {target} is not a directory")
        # A config written for an endpoint stays usable with a local model: the HTTP options
        # mean nothing here.
        local = {k: v for k, v in kwargs.items() if k not in _HTTP_ONLY}
        return LocalTeacher(target, **local)
    if kind == "openai":
        return OpenAITeacher(target, **kwargs)
    raise ValueError(f"teacher spec {spec!r}: unknown backend {kind!r}; use 'local:' or "
                     f"'openai:'")
