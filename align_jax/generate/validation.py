"""The server's request validation: its state, and OpenAI bodies -> token ids and a `Job`.

Every function here runs in a worker thread (the handlers in server.py call them through
`asyncio.to_thread`), never on the event loop, and raises `APIError` with a 4xx status for a
bad request. Large bodies are encoded in a child process (encode_pool.py), and their ids are
checked as arrays, so that a multi-megabyte prompt never holds the GIL for long.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

from align_jax.generate import constraints
from align_jax.generate.encode_pool import EncodePool, prompt_encoder, text_encoder
from align_jax.generate.http_io import json_ints
from align_jax.generate.metrics import Metrics
from align_jax.generate.openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    message_dicts,
    parse_body,
)
from align_jax.generate.sampling import row_seed, settings_arrays
from align_jax.generate.serving import Batcher, Job


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerState:
    """What the handlers share: the model, its limits, the batcher and the encoder.

    Attributes:
      config, tokenizer: the model's config and tokenizer.
      batcher: the `Batcher` that runs generation.  encoder: encodes prompts (large bodies in a
        child process).
      model_name: the id clients pass as `model`.  api_key: the bearer token, or None.
      max_len: context length.  max_prompt: longest accepted prompt, in tokens.
      max_new: largest accepted max_tokens.  max_body_bytes: largest accepted body (413).
      max_prompts: most prompts one request may carry.  max_request_tokens: most tokens one
        request may ask for (its prompt tokens + max_tokens per prompt), so that one request
        cannot hold the queue for long.
      started: creation time (unix seconds), reported by /v1/models.
      strict: unknown body fields are 400s; otherwise they are dropped with a warning.
      metrics: the counters served at /metrics.
    """

    config: object
    tokenizer: object
    batcher: Batcher
    encoder: EncodePool
    model_name: str
    api_key: str | None
    max_len: int
    max_prompt: int
    max_new: int
    max_body_bytes: int
    max_prompts: int
    max_request_tokens: int
    started: int
    strict: bool = False
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    # The Retry-After (seconds) of a 503 when the batcher's queue is full.
    retry_after_s: int = 1


def authorize(state: ServerState, headers: Mapping[str, str]) -> None:
    """Raises APIError(401) unless the headers carry the server's API key (if it has one)."""
    if state.api_key is None:
        return
    got = headers.get("authorization", "")
    if not hmac.compare_digest(got.encode(), f"Bearer {state.api_key}".encode()):
        raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer "
                       "<key>')", code="invalid_api_key")


def _parse(state: ServerState, model, raw: bytes):
    """`parse_body` under the server's strictness; dropped unknown fields are logged (once
    per field name at warning level)."""
    req, unknown = parse_body(model, raw, strict=state.strict)
    for name in unknown:
        state.batcher.once.warn(f"unknown-field:{name}", "ignored the unknown field %r of a "
                                "request (serve with strict=True to reject such requests)",
                                name)
    return req


def _check_common(state: ServerState, req: SamplingFields) -> None:
    if req.model is not None and req.model != state.model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                       f"{state.model_name!r}", param="model", code="model_not_found")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops) or len(stops) > 16:
        raise APIError(400, "stop must be up to 16 non-empty strings", param="stop")


def _check_prompts(state: ServerState, prompts: Sequence, *, param: str,
                   allow_empty: bool = False) -> list[list[int]]:
    """Length and id-range checks (vectorized: a prompt may be millions of ids) -> lists."""
    if not allow_empty and (not prompts or any(len(x) == 0 for x in prompts)):
        raise APIError(400, "prompt is empty", param=param)
    longest = max(len(p) for p in prompts)
    if longest > state.max_prompt and not allow_empty:
        raise APIError(400, f"the prompt has {longest} tokens; this server accepts at most "
                       f"{state.max_prompt}", param=param, code="context_length_exceeded")
    out = []
    for p in prompts:
        try:
            ids = np.asarray(p, dtype=np.int64)
            bad = ids[(ids < 0) | (ids >= state.config.vocab_size)]
        except OverflowError:  # beyond int64: certainly out of range
            bad = np.asarray([t for t in p if not 0 <= t < state.config.vocab_size], object)
        if bad.size:
            raise APIError(400, f"prompt token id {bad[0]} is outside "
                           f"[0, {state.config.vocab_size})", param=param)
        out.append(ids.tolist())
    return out


def _constraint(state: ServerState, req: SamplingFields) -> constraints.Constraint | None:
    """The request's constraint (response_format, guided_*, structured_outputs), compiled for
    the served tokenizer; APIError(400) with one line for a bad or unsatisfiable one."""
    given = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_object":
            given.append(("response_format", lambda: constraints.json_object()))
        else:
            spec = fmt.json_schema
            if spec is None or spec.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema",
                               param="response_format")
            given.append(("response_format", lambda: constraints.json_schema(spec.schema_)))
    if req.guided_choice is not None:
        given.append(("guided_choice", lambda: constraints.choice(req.guided_choice)))
    if req.guided_regex is not None:
        given.append(("guided_regex", lambda: constraints.regex(req.guided_regex)))
    if req.guided_json is not None:
        given.append(("guided_json", lambda: constraints.json_schema(req.guided_json)))
    so = req.structured_outputs
    if so is not None:
        kinds = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex),
                                      ("choice", so.choice), ("json_object", so.json_object))
                 if v is not None and v is not False]
        if len(kinds) != 1:
            raise APIError(400, "structured_outputs needs exactly one of json, regex, choice, "
                           "json_object", param="structured_outputs")
        kind, value = kinds[0]
        build = {"json": constraints.json_schema, "regex": constraints.regex,
                 "choice": constraints.choice}.get(kind)
        given.append((f"structured_outputs.{kind}",
                      (lambda: build(value)) if build else constraints.json_object))
    if not given:
        return None
    if len(given) > 1:
        raise APIError(400, f"give one structured-output field, not {given[0][0]} and "
                       f"{given[1][0]}", param=given[1][0])
    param, make = given[0]
    try:
        c = make()
        constraints.compile_constraint(c, state.tokenizer)
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None
    return c


def _make_job(state: ServerState, req: SamplingFields, prompts: list[list[int]],
              max_tokens: int | None, *, default_max: int, prompt_param: str,
              logprobs: int | None = None) -> Job:
    if len(prompts) * req.n > state.max_prompts:
        raise APIError(400, f"this request asks for {len(prompts)} prompt(s) x n={req.n} "
                       f"choices; this server accepts at most {state.max_prompts} per request",
                       param="n", code="request_too_large")
    # n choices per prompt: its rows repeat, each with a seed of its own (row_seed below);
    # choice i*n + j is prompt i's j-th, as in OpenAI's answers.
    prompts = [p for p in prompts for _ in range(req.n)]
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        max_tokens = max(1, min(default_max, state.max_len - longest))
    if not 1 <= max_tokens <= state.max_new:
        raise APIError(400, f"max_tokens={max_tokens} is out of range: it must be between "
                       f"1 and {state.max_new}", param="max_tokens")
    if longest + max_tokens > state.max_len:
        raise APIError(400, f"the prompt ({longest} tokens) + max_tokens ({max_tokens}) "
                       f"exceeds the context length {state.max_len}; shorten the prompt or "
                       f"lower max_tokens", param=prompt_param, code="context_length_exceeded")
    total = sum(len(p) for p in prompts) + len(prompts) * max_tokens
    if total > state.max_request_tokens:
        raise APIError(400, f"this request asks for {total} tokens ({len(prompts)} prompt(s): "
                       f"their tokens + max_tokens={max_tokens} each); this server accepts at "
                       f"most {state.max_request_tokens} per request; split it or lower "
                       f"max_tokens", param=prompt_param, code="request_too_large")
    seed = req.seed if req.seed is not None else secrets.randbits(32)
    sampling = dict(temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
                    min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                    presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty)
    try:  # the checks generate makes, here: a bad value is a 400, not a worker error
        settings_arrays(1, **sampling)
    except (ValueError, OverflowError) as e:
        raise APIError(400, str(e)) from None
    return Job(prompts=prompts, max_tokens=max_tokens,
               seeds=[row_seed(seed, i) for i in range(len(prompts))], sampling=sampling,
               stop=tuple([req.stop] if isinstance(req.stop, str) else req.stop or ()),
               constraint=_constraint(state, req), logprobs=logprobs,
               logit_bias=_logit_bias(state, req.logit_bias))


def _logit_bias(state: ServerState, given: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias ({"token id": bias in -100..100}) -> {id: bias}, or None."""
    if not given:
        return None
    if len(given) > 1024:
        raise APIError(400, f"logit_bias has {len(given)} entries; at most 1024",
                       param="logit_bias")
    out = {}
    for key, bias in given.items():
        try:
            i = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias key {key!r} is not a token id",
                           param="logit_bias") from None
        if not 0 <= i < state.config.vocab_size:
            raise APIError(400, f"logit_bias token id {i} is outside "
                           f"[0, {state.config.vocab_size})", param="logit_bias")
        if not -100.0 <= bias <= 100.0:
            raise APIError(400, f"logit_bias[{key!r}]={bias} is outside -100..100",
                           param="logit_bias")
        out[i] = float(bias)
    return out


def _encode(state: ServerState, encode, prompts: list, *, raw: bytes, param: str) -> list:
    """`state.encoder.encode`, with its errors as OpenAI errors."""
    try:
        return state.encoder.encode(encode, prompts, body_bytes=len(raw))
    except (ValueError, TypeError) as e:  # e.g. a chat template that rejects the messages
        raise APIError(400, f"{param}: {e}", param=param) from None
    except RuntimeError as e:  # the tokenizer process died
        raise APIError(500, str(e), type="server_error") from None


def prepare_completion(state: ServerState, raw: bytes):
    """Parses, validates and tokenizes a /v1/completions body -> (request, prompts, job)."""
    req = _parse(state, CompletionRequest, raw)
    _check_common(state, req)
    for name, ok in (("best_of", req.best_of in (None, 1)), ("suffix", req.suffix is None)):
        if not ok:
            raise APIError(400, f"{name} is not supported", param=name)
    for name, on in (("echo", req.echo), ("logprobs", req.logprobs is not None)):
        if on and req.stream:
            raise APIError(400, f"{name} is not supported with stream: true", param=name)
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    elif p and all(isinstance(x, int) for x in p):
        p = [p]
    if len(p) > state.max_prompts:
        raise APIError(400, f"this request has {len(p)} prompts; this server accepts at most "
                       f"{state.max_prompts} per request", param="prompt",
                       code="request_too_large")
    texts = [x for x in p if isinstance(x, str)]
    for i, x in enumerate(p):
        if x == "":  # it would encode to BOS alone: a completion of nothing
            raise APIError(400, "prompt is empty" if len(p) == 1 else
                           f"prompt {i} is an empty string", param="prompt")
    encoded = iter(_encode(state, prompt_encoder(chat_template=False), texts, raw=raw,
                           param="prompt"))
    prompts = _check_prompts(state, [next(encoded) if isinstance(x, str) else x for x in p],
                             param="prompt")
    return req, prompts, _make_job(state, req, prompts, req.max_tokens, default_max=16,
                                   prompt_param="prompt", logprobs=req.logprobs)


def prepare_chat(state: ServerState, raw: bytes):
    """Parses, validates and renders + tokenizes a /v1/chat/completions body
    -> (request, prompt ids, job)."""
    req = _parse(state, ChatRequest, raw)
    _check_common(state, req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.logprobs and req.stream:
        raise APIError(400, "logprobs is not supported with stream: true", param="logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both",
                       param="max_tokens")
    encoded = _encode(state, prompt_encoder(chat_template=True), [message_dicts(req.messages)],
                      raw=raw, param="messages")
    ids = _check_prompts(state, encoded, param="messages")[0]
    job = _make_job(state, req, [ids], req.max_tokens if req.max_tokens is not None
                    else req.max_completion_tokens, default_max=state.max_new,
                    prompt_param="messages",
                    logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    return req, ids, job


def tokenize_json(state: ServerState, raw: bytes) -> str:
    """Parses and tokenizes a /tokenize body -> the JSON answer {tokens, count, max_model_len}."""
    req = _parse(state, TokenizeRequest, raw)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if req.prompt is not None:
        ids = _encode(state, text_encoder(add_special_tokens=req.add_special_tokens), [req.prompt],
                      raw=raw, param="prompt")[0]
    else:
        ids = _encode(state, prompt_encoder(chat_template=True), [message_dicts(req.messages)],
                      raw=raw, param="messages")[0]
    # Rendered in pieces: a 4 MB prompt is millions of ids, and one json.dumps of them would
    # hold the GIL (and so the event loop) for seconds.
    return (f'{{"tokens": {json_ints(ids)}, "count": {len(ids)}, '
            f'"max_model_len": {state.max_len}}}')


def detokenize_json(state: ServerState, raw: bytes) -> dict:
    """Parses a /detokenize body -> the answer {"prompt": text}; ids must be in the vocabulary."""
    req = _parse(state, DetokenizeRequest, raw)
    if req.model is not None and req.model != state.model_name:
        raise APIError(404, f"model {req.model!r} does not exist", param="model",
                       code="model_not_found")
    ids = _check_prompts(state, [req.tokens], param="tokens", allow_empty=True)[0]
    return {"prompt": state.tokenizer.decode(ids)}
