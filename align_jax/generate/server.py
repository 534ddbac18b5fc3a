"""An OpenAI-compatible HTTP server over `align_jax.generate` (`align-jax serve`).

Endpoints, in OpenAI's JSON schema: GET /v1/models, POST /v1/completions and
POST /v1/chat/completions (`stream: true` answers with server-sent events), plus
POST /tokenize and /v1/tokenize (vLLM's shape, so teachers can count tokens remotely),
POST /detokenize and /v1/detokenize, GET /version, GET /metrics (Prometheus text: requests by
path and status, prompt and generated tokens, queue, latency histogram) and GET /health.
OpenAI fields: n (choices per prompt), presence_penalty, frequency_penalty, logit_bias,
logprobs (completions: top alternatives per token; chat: with top_logprobs) and echo
(completions; with logprobs, the prompt's log-probs too) - logprobs and echo not with stream.
Extensions accepted in the body: top_k (0 or -1 = off), min_p, repetition_penalty. Unknown
fields are ignored with one warning per field name (`strict=True`: 400).
Limits, each a 400 naming the field: empty prompts, seeds outside int64, more than
`max_prompts_per_request` rows (prompts x n), more than `max_request_tokens` tokens (prompt
tokens + max_tokens per row). Compiled programs are kept in a bounded LRU
(`max_compiled_shapes`, shape_cache.py): memory stays flat under mixed prompt lengths.
Structured generation (both endpoints, streaming too): OpenAI's `response_format`
({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}), and
vLLM's `guided_choice`, `guided_regex`, `guided_json` and `structured_outputs` ({"choice"},
{"regex"}, {"json"} or {"json_object"}); a bad or unsatisfiable one is a 400 naming it.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} (openai_api.py).

The handlers are module-level functions over one `ServerState` (validation.py), kept in
`app.state.server`. They read the body (at most `max_body_bytes`, else 413), then parse,
validate and tokenize it in a worker thread (`asyncio.to_thread`; bodies over 256 KiB are
tokenized in a child process, encode_pool.py, since converting millions of ids to Python
objects holds the GIL), so a large request never blocks the event loop (GET /health stays
fast), then hand a job to the `Batcher`'s worker thread (serving.py), which batches
concurrent requests into shared `generate` calls and settles each request's asyncio future;
generation never runs on the event loop. A client that goes away (a closed stream, a dropped
connection) cancels its job: a queued job is dropped and a running generation whose clients
all left stops at its next chunk boundary.

Streaming is live: a streaming request's rows are decoded in chunks of `STREAM_CHUNK` steps,
and after each chunk the text that can no longer change is sent as a delta; the deltas
concatenate to exactly the non-streamed text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid

import fastapi
import uvicorn
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from align_jax.generate import shape_cache
from align_jax.generate.encode_pool import EncodePool
from align_jax.generate.http_io import (
    BODY_BYTES_PER_TOKEN,
    MIN_BODY_BYTES,
    cancel_on_disconnect,
    read_body,
)
from align_jax.generate.metrics import CountRequests
from align_jax.generate.openai_api import APIError, sse
from align_jax.generate.row_batcher import Queueing, RowBatcher
from align_jax.generate.serving import Batcher, Cancelled, Job, Overloaded, Row
from align_jax.generate.validation import (
    ServerState,
    authorize,
    detokenize_json,
    prepare_chat,
    prepare_completion,
    tokenize_json,
)

log = logging.getLogger(__name__)


def make_app(config, params, tokenizer, *, model_name: str, api_key: str | None = None,
             max_batch_size: int = 16, batch_window_s: float = 0.01,
             max_len: int | None = None, max_prompt_tokens: int | None = None,
             max_new_tokens_limit: int | None = None, mesh=None,
             rules="fsdp", max_body_bytes: int | None = None,
             max_prompts_per_request: int = 64, max_request_tokens: int | None = None,
             max_compiled_shapes: int | None = 64, strict: bool = False,
             queueing: Queueing | None = None) -> fastapi.FastAPI:
    """Builds the FastAPI app (run it with uvicorn, or `ServerThread` in tests/notebooks).

    Args:
      config, params: the model.  tokenizer: its `align_jax.tokenizer.Tokenizer`.
      model_name: the id clients pass as `model` (others get 404).
      api_key: when set, requests must send `Authorization: Bearer <api_key>` (else 401).
      max_batch_size: prompt rows the worker collects before it stops waiting.
      batch_window_s: how long the worker waits for more requests after the first one.
      max_len: context length (prompt + completion); default config.max_position.
      max_prompt_tokens: longest accepted prompt; default max_len - 1.
      max_new_tokens_limit: largest accepted max_tokens; default min(4096, max_len - 1).
      mesh, rules: passed to `generate`.
      max_body_bytes: largest accepted request body (413 beyond); default
        max(1 MiB, 16 bytes x max_prompt_tokens).
      max_prompts_per_request: most prompts one /v1/completions request may carry (400 beyond).
      max_request_tokens: most tokens one request may ask for, its prompt tokens plus
        max_tokens per prompt (400 beyond), so that one huge request cannot make the others
        wait behind it; default max(65536, max_len).
      max_compiled_shapes: compiled programs kept (least recently used dropped first): each
        new prompt-length bucket, budget or shared-prefix length compiles a prefill and a
        decode program, and memory grows with them; None keeps all. Process-wide
        (`shape_cache.set_max_programs`).
      strict: unknown fields in a body are 400s (OpenAI's own behaviour); by default they
        are ignored with a warning in the log, since newer clients send fields this server
        does not know.
      queueing: a `row_batcher.Queueing` record: continuous batching over max_batch_size
        fixed rows and the queue limit (503 beyond); None (default here): the batch window
        with an unbounded queue. With a mesh, batching is always by window.
    Returns:
      The app; `app.state.batcher` is its `Batcher` (a `RowBatcher` with continuous
      queueing), `app.state.server` its `ServerState`.
    """
    max_len = int(max_len or config.max_position)
    max_prompt = int(max_prompt_tokens or max_len - 1)
    for name, value in (("max_prompts_per_request", max_prompts_per_request),
                        ("max_request_tokens", max_request_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"serve: {name} must be a positive int, got {value!r}")
    shape_cache.set_max_programs(max_compiled_shapes)
    queueing = queueing or Queueing(continuous=False, max_queue=None)
    batcher = Batcher(config, params, tokenizer, max_len=max_len,
                      max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                      mesh=mesh, rules=rules, max_queue=queueing.max_queue)
    if queueing.continuous and mesh is None:
        batcher = RowBatcher(config, params, tokenizer, max_len=max_len,
                             max_batch_size=max_batch_size, max_queue=queueing.max_queue,
                             warm_prompt=max_prompt, chunk=queueing.chunk, fallback=batcher)
    elif queueing.continuous:
        log.info("serve: continuous batching runs on one device; with a mesh requests are "
                 "batched by window")
    state = ServerState(
        config=config, tokenizer=tokenizer, model_name=model_name, api_key=api_key,
        batcher=batcher,
        encoder=EncodePool(tokenizer), max_len=max_len, max_prompt=max_prompt,
        max_new=int(max_new_tokens_limit or min(4096, max_len - 1)),
        max_body_bytes=int(max_body_bytes or max(MIN_BODY_BYTES,
                                                 BODY_BYTES_PER_TOKEN * max_prompt)),
        max_prompts=max_prompts_per_request,
        max_request_tokens=max_request_tokens or max(65536, max_len),
        started=int(time.time()), strict=bool(strict), retry_after_s=queueing.retry_after_s)
    app = fastapi.FastAPI(title="align-jax", lifespan=_lifespan)
    app.state.server, app.state.batcher = state, state.batcher
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_left)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/v1/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/v1/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/version", version, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_middleware(CountRequests, metrics=state.metrics)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: fastapi.FastAPI):
    state: ServerState = app.state.server
    state.batcher.start()
    try:
        yield
    finally:
        state.batcher.stop()
        state.encoder.close()


async def _api_error(_, e: APIError):
    return e.response()


async def _http_error(request: fastapi.Request, e: StarletteHTTPException):
    return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                    code=str(e.status_code)).response()


async def _client_left(request: fastapi.Request, _):
    # The client hung up while sending its body: nobody reads an answer; one line, not an
    # "Exception in ASGI application" traceback per dropped client.
    log.info("%s %s: the client disconnected before sending its whole request",
             request.method, request.url.path)
    return fastapi.Response(status_code=499)


def _state(request: fastapi.Request) -> ServerState:
    return request.app.state.server


# ----------------------------------------------------------------------------- handlers


async def health():
    """GET /health: answers as long as the event loop runs."""
    return {"status": "ok"}


async def list_models(request: fastapi.Request):
    """GET /v1/models: the one served model."""
    state = _state(request)
    authorize(state, request.headers)
    return {"object": "list", "data": [_model_card(state)]}


async def get_model(name: str, request: fastapi.Request):
    """GET /v1/models/{name}."""
    state = _state(request)
    authorize(state, request.headers)
    if name != state.model_name:
        raise APIError(404, f"model {name!r} does not exist", param="model",
                       code="model_not_found")
    return _model_card(state)


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.started,
            "owned_by": "align-jax", "max_model_len": state.max_len}


async def completions(request: fastapi.Request):
    """POST /v1/completions."""
    return await _complete(request, chat=False)


async def chat_completions(request: fastapi.Request):
    """POST /v1/chat/completions."""
    return await _complete(request, chat=True)


async def _complete(request: fastapi.Request, *, chat: bool):
    """Both endpoints: parse the body off the event loop, then stream or answer at once."""
    state = _state(request)
    authorize(state, request.headers)
    raw = await read_body(request, state.max_body_bytes)
    if chat:
        req, ids, job = await asyncio.to_thread(prepare_chat, state, raw)
        prompts = [ids]
    else:
        req, prompts, job = await asyncio.to_thread(prepare_completion, state, raw)
    if req.stream:
        # A stream's status goes out before its job is queued: a full queue is refused here.
        limit = getattr(state.batcher, "max_queue", None)
        if limit is not None and state.batcher.queued() >= limit:
            raise _overloaded(state, f"{state.batcher.queued()} requests are waiting "
                                     f"(max_queue={limit}); retry later")
        return _stream_answer(state, req, prompts, job, chat=chat)
    return _answer(state, req, prompts, job, await _run(state, job, request), chat=chat)


async def tokenize(request: fastapi.Request):
    """POST /tokenize (vLLM's shape): {tokens, count, max_model_len}."""
    state = _state(request)
    authorize(state, request.headers)
    raw = await read_body(request, state.max_body_bytes)
    return fastapi.Response(await asyncio.to_thread(tokenize_json, state, raw),
                            media_type="application/json")


async def detokenize(request: fastapi.Request):
    """POST /detokenize (vLLM's shape): {tokens} -> {prompt}."""
    state = _state(request)
    authorize(state, request.headers)
    raw = await read_body(request, state.max_body_bytes)
    return await asyncio.to_thread(detokenize_json, state, raw)


async def version():
    """GET /version: the align_jax version serving."""
    import align_jax

    return {"version": align_jax.__version__}


async def metrics(request: fastapi.Request):
    """GET /metrics: Prometheus text (requests by path and status, tokens, queue, latency)."""
    state = _state(request)
    authorize(state, request.headers)
    return fastapi.Response(state.metrics.render(queued=state.batcher.queued()),
                            media_type="text/plain; version=0.0.4")


# ----------------------------------------------------------------------------- answers


def _overloaded(state: ServerState, message: str) -> APIError:
    return APIError(503, message, type="server_overloaded", code="overloaded",
                    headers={"Retry-After": str(state.retry_after_s)})


async def _run(state: ServerState, job: Job, request: fastapi.Request | None = None
               ) -> list[Row]:
    """The job's rows; with `request`, the job is cancelled when its client disconnects."""
    task = asyncio.ensure_future(state.batcher.run(job))
    watch = (asyncio.ensure_future(cancel_on_disconnect(request, task))
             if request is not None else None)
    try:
        return await task
    except asyncio.CancelledError:
        if request is None or not task.cancelled():
            raise
        raise APIError(499, "the client closed the request", code="client_closed") from None
    except Cancelled:
        raise APIError(499, "the client closed the request", code="client_closed") from None
    except Overloaded as e:
        raise _overloaded(state, str(e)) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise APIError(500, f"generation failed: {type(e).__name__}: {e}",
                       type="server_error") from None
    finally:
        if watch is not None:
            watch.cancel()


def _usage(prompts, rows, metrics=None) -> dict:
    p, c = sum(len(x) for x in prompts), sum(len(r.tokens) for r in rows)
    if metrics is not None:
        metrics.tokens(p, c)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _head(state: ServerState, *, chat: bool) -> dict:
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": state.model_name}


def _answer(state: ServerState, req, prompts, job: Job, rows: list[Row], *, chat: bool
            ) -> JSONResponse:
    """The whole answer as one JSON response."""
    piece = _token_text(state.tokenizer)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                    "logprobs": None if r.scores is None else _chat_logprobs(
                        piece, job.prompts[i], r, job.logprobs)}
                   for i, r in enumerate(rows)]
    else:
        echo = _echo_texts(state, req) if req.echo else None
        choices = [{"index": i, "text": (echo[i] if echo else "") + r.text,
                    "finish_reason": r.finish_reason,
                    "logprobs": None if r.scores is None else _completion_logprobs(
                        piece, job.prompts[i], r, job.logprobs, echo=req.echo)}
                   for i, r in enumerate(rows)]
    return JSONResponse({**_head(state, chat=chat),
                         "object": "chat.completion" if chat else "text_completion",
                         "choices": choices,
                         "usage": _usage(prompts, rows, state.metrics)})


def _echo_texts(state: ServerState, req) -> list[str]:
    """The prompt of each choice as echoed: the string given, or the ids decoded."""
    p = req.prompt
    if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
        p = [p]
    texts = [x if isinstance(x, str) else state.tokenizer.decode(x) for x in p]
    return [t for t in texts for _ in range(req.n)]


def _token_text(tokenizer):
    """id -> its text (cached per answer: top alternatives repeat)."""
    return functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))


def _positions(prompt: list[int], row: Row, *, echo: bool):
    """(token id, log-prob or None, [(alternative id, log-prob)]) of each answered token:
    the completion's, after the prompt's with `echo` (its first token has no log-prob)."""
    s, n = row.scores, len(prompt)
    out = [(prompt[0], None, [])] if echo else []
    start = 0 if echo else n - 1
    seq = prompt + row.tokens
    for t in range(start, len(s.logps)):
        out.append((seq[t + 1], s.logps[t], list(zip(s.top_ids[t], s.top_logps[t]))))
    return out


def _completion_logprobs(piece, prompt, row: Row, top: int, *, echo: bool) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs (the top
    `top` alternatives, plus the chosen token), text_offset (within the returned text)."""
    tokens, logps, tops, offsets, at = [], [], [], [], 0
    for i, lp, alts in _positions(prompt, row, echo=echo):
        text = piece(i)
        tokens.append(text)
        logps.append(lp)
        offsets.append(at)
        at += len(text)
        if lp is None:
            tops.append(None)
        else:
            alt = {piece(a): v for a, v in alts[:top]}
            alt.setdefault(text, lp)
            tops.append(alt)
    return {"tokens": tokens, "token_logprobs": logps, "top_logprobs": tops,
            "text_offset": offsets}


def _chat_logprobs(piece, prompt, row: Row, top: int) -> dict:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(i, lp):
        text = piece(i)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**entry(i, lp), "top_logprobs": [entry(a, v) for a, v in alts[:top]]}
                        for i, lp, alts in _positions(prompt, row, echo=False)],
            "refusal": None}


def _stream_answer(state: ServerState, req, prompts, job: Job, *, chat: bool
                   ) -> StreamingResponse:
    """Server-sent events, live: each row's new text is sent at every decode chunk."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    job.on_partial = lambda row, text: loop.call_soon_threadsafe(
        updates.put_nowait, (row, text))
    task = asyncio.ensure_future(_run(state, job))
    head = {**_head(state, chat=chat),
            "object": "chat.completion.chunk" if chat else "text_completion"}

    async def events():
        try:
            async for event in _events(state, req, prompts, task, updates, head, chat=chat,
                                       task_rows=job.prompts):
                yield event
        finally:
            # Normal end, or the client went away (the generator is closed): stop the
            # job's generation if it is still running.
            if not task.done():
                job.cancelled.set()
                task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _choice(i: int, piece: str | None, reason: str | None, *, chat: bool) -> dict:
    if chat:
        delta = {} if piece is None else {"content": piece}
        return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
    return {"index": i, "text": piece or "", "finish_reason": reason, "logprobs": None}


async def _events(state: ServerState, req, prompts, task: asyncio.Future,
                  updates: asyncio.Queue, head: dict, *, chat: bool, task_rows: list):
    """The events of one streamed answer: partial texts while `task` runs, then the rest
    (`task_rows`: the job's prompt rows, n per prompt)."""
    sent = [""] * len(task_rows)

    def delta(i, text):
        # Partial texts only grow; anything else waits for the final text.
        if len(text) > len(sent[i]) and text.startswith(sent[i]):
            piece, sent[i] = text[len(sent[i]):], text
            return sse({**head, "choices": [_choice(i, piece, None, chat=chat)]})
        return None

    if chat:
        for i in range(len(task_rows)):
            yield sse({**head, "choices": [{
                "index": i, "delta": {"role": "assistant", "content": ""},
                "finish_reason": None, "logprobs": None}]})
    while not task.done() or not updates.empty():
        getter = asyncio.ensure_future(updates.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            event = delta(*getter.result())
            if event:
                yield event
        else:
            getter.cancel()
    try:
        rows = task.result()
    except APIError as e:
        # The response has started: the error travels as an event.
        yield sse({"error": {"message": e.message, "type": e.type, "param": e.param,
                             "code": e.code}})
        yield "data: [DONE]\n\n"
        return
    for i, r in enumerate(rows):
        if r.text.startswith(sent[i]):
            if len(r.text) > len(sent[i]):
                yield sse({**head, "choices": [_choice(i, r.text[len(sent[i]):], None,
                                                       chat=chat)]})
        else:
            state.batcher.once.warn("stream-diverged",
                                    "streamed text of row %d diverged from its final text", i)
        yield sse({**head, "choices": [_choice(i, None, r.finish_reason, chat=chat)]})
    usage = _usage(prompts, rows, state.metrics)
    if req.stream_options is not None and req.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


class _Server(uvicorn.Server):
    """uvicorn, except that a SIGINT/SIGTERM stop returns normally from run().

    uvicorn re-raises the caught signal after its graceful shutdown, which would kill the
    process before `serve_main` completes its run folder.
    """

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()


class ServerThread:
    """Runs an app under uvicorn in a background thread (tests, notebooks).

    Binds before starting, so port=0 picks a free port; `url` is http://host:port.
    """

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", startup_timeout: float = 30.0):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.host, self.port = host, sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="align-jax-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {host}:{self.port} did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def app_from_checkpoint(model_dir: str, *, model_name: str | None = None,
                        dtype: str = "float32", mesh=None, rules: str = "fsdp",
                        **kwargs) -> fastapi.FastAPI:
    """Loads a Hugging Face checkpoint dir (with its tokenizer files) and builds the app.

    Args:
      model_dir: the checkpoint dir, a .gguf file or a named default model.
      model_name: the served model id (default: the dir's base name).
      dtype: parameter/compute dtype.  mesh, rules: shard the model (None: one device).
      **kwargs: passed to `make_app`.
    Returns:
      The app.
    """
    import jax.numpy as jnp

    from align_jax.models.hf import load_hf
    from align_jax.models.named import resolve_model_path
    from align_jax.tokenizer import load_tokenizer

    config, params = load_hf(model_dir, dtype=jnp.dtype(dtype), mesh=mesh, rules=rules)
    tokenizer = load_tokenizer(resolve_model_path(model_dir))
    name = model_name or os.path.basename(os.path.normpath(model_dir))
    return make_app(config, params, tokenizer, model_name=name, mesh=mesh, rules=rules,
                    **kwargs)


def serve_main(*, model_dir: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, model_name: str | None = None,
               max_batch_size: int = 16, batch_window_ms: float = 10.0,
               max_len: int | None = None, max_prompt_tokens: int | None = None,
               max_new_tokens_limit: int | None = None, dtype: str = "float32",
               mesh_spec=None, rules: str = "fsdp", output_dir: str | None = None,
               log_level: str = "info", max_body_bytes: int | None = None,
               max_prompts_per_request: int = 64, max_request_tokens: int | None = None,
               max_compiled_shapes: int | None = 64, strict: bool = False,
               queueing: Queueing = Queueing(continuous=False)) -> int:
    """Entry of `align-jax serve`: serves an HF checkpoint dir until stopped (Ctrl-C).

    Args:
      model_dir: Hugging Face checkpoint dir (config.json, safetensors, tokenizer files), a
        .gguf file, or a named default such as 'smollm2-135m-instruct'.
      host, port: where to listen; keep 127.0.0.1 unless an api_key guards the server.
      api_key: required bearer token; default: $ALIGN_JAX_API_KEY if set, else none.
      model_name: the served model id (default: the dir's base name).
      max_batch_size: prompt rows the worker collects before it stops waiting.
      batch_window_ms: how long the worker waits for more requests after the first one.
      max_len: context length (prompt + completion); default the model's max_position.
      max_prompt_tokens: longest accepted prompt; default max_len - 1.
      max_new_tokens_limit: largest accepted max_tokens; default min(4096, max_len - 1).
      dtype: parameter/compute dtype.
      mesh_spec, rules: shard the model over a mesh (`sharding.MeshSpec`) with this sharding
        preset; None keeps it on one device.
      output_dir: run folder for the config and run info.
      log_level: the server's log level ("debug", "info", "warning", ...).
      max_body_bytes: largest accepted request body (413 beyond); default
        max(1 MiB, 16 bytes x max_prompt_tokens).
      max_prompts_per_request: most prompt rows (prompts x n) one request may carry (400
        beyond).
      max_request_tokens: most tokens one request may ask for, prompt tokens plus max_tokens
        per row (400 beyond); default max(65536, max_len).
      max_compiled_shapes: compiled programs kept, least recently used dropped first (memory
        grows with each new prompt-length bucket or budget); None keeps all.
      strict: unknown body fields are 400s; by default they are ignored with one warning.
      queueing: `row_batcher.Queueing` (gin: `server.serve_main.queueing =
        @row_batcher.Queueing()`): by default the batch window and 503 beyond 256 waiting
        requests; `Queueing()` turns on continuous batching over max_batch_size rows of
        max_len slots each (compiled at start for every prompt bucket up to
        max_prompt_tokens: set max_len to what clients need, the cache holds rows x max_len).
    Returns:
      0 after a clean shutdown.
    Raises:
      ValueError: the port is not in 0..65535 or cannot be bound (checked first, before the
        model loads).
    """
    from align_jax import runinfo, sharding

    sock = bind_socket(host, port)  # fail at once, before minutes of model loading
    api_key = api_key or os.environ.get("ALIGN_JAX_API_KEY") or None
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    with contextlib.closing(sock), runinfo.run_folder(output_dir):
        mesh = sharding.make_mesh(mesh_spec) if mesh_spec is not None else None
        app = app_from_checkpoint(
            model_dir, model_name=model_name, dtype=dtype, mesh=mesh, rules=rules,
            api_key=api_key, max_batch_size=max_batch_size,
            batch_window_s=batch_window_ms / 1000.0, max_len=max_len,
            max_prompt_tokens=max_prompt_tokens, max_new_tokens_limit=max_new_tokens_limit,
            max_body_bytes=max_body_bytes, max_prompts_per_request=max_prompts_per_request,
            max_request_tokens=max_request_tokens, max_compiled_shapes=max_compiled_shapes,
            strict=strict, queueing=queueing)
        bound = sock.getsockname()[1]
        _Server(uvicorn.Config(app, host=host, port=bound, log_level=log_level)).run(
            sockets=[sock])
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), for uvicorn to listen on.

    Raises:
      ValueError: one line naming the port: outside 0..65535, or it cannot be bound (in use,
        no permission, unknown host).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"serve: port={port!r} is not a TCP port (0..65535)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"serve: cannot listen on {host}:{port}: "
                         f"{e.strerror or e}") from None
    return sock
