"""Request batching for the HTTP server: one worker thread turns queued requests into a few
shared `generate` calls.

The worker waits up to `batch_window_s` after the first job (or until `max_batch_size` prompt
rows are queued) and runs the collected rows through one `generate` call per group. generate
takes per-row temperature, top_k, top_p, min_p, repetition_penalty and seeds, so rows with
different settings share a call. Groups split on what cannot vary per row: the stop strings,
and the sampler's static flags: sampled rows are grouped by (top_k, top_p < 1, min_p > 0) so
that a request's samples never depend on which other requests it was batched with (the flags
decide e.g. whether the vocabulary is sorted before the draw); greedy rows join any group
with their stop strings. A call's budget is the largest max_tokens in it, rounded up to a
power of two (fewer compilations); each row is then cut to its own max_tokens, which gives
exactly the tokens a call with that budget gives, because a row's draw at step t depends only
on its own key and t.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from align_jax.generate.constraints import compile_constraint
from align_jax.generate.loop import Completion, GenerationOutput, generate_stream
from align_jax.generate.prompt_batches import next_pow2
from align_jax.generate.token_scores import TokenScores, token_scores

log = logging.getLogger(__name__)

_MIN_BUDGET = 16
# Decode steps between the partial texts a streaming request receives: the host syncs this
# often, so small enough to feel live, large enough to keep the device busy.
STREAM_CHUNK = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One generated answer: tokens (incl. a final stop token), text, "stop" or "length";
    with a job's `logprobs`, `scores` of its prompt + tokens (positions 1..)."""

    tokens: list[int]
    text: str
    finish_reason: str
    scores: TokenScores | None = None


@dataclasses.dataclass(kw_only=True)
class Job:
    """Prompts that share settings (one request), and the callback that gets their rows."""

    prompts: list[list[int]]
    max_tokens: int
    # temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty
    sampling: dict[str, float]
    seeds: list[int]
    stop: tuple[str, ...]
    # Structured generation: every prompt of the job follows it (None: free text).
    constraint: object = None
    # Log-probs of each row's prompt + tokens with this many top alternatives (None: none).
    logprobs: int | None = None
    # {token id: bias} added to the logits of every row of the job (None: none).
    logit_bias: dict[int, float] | None = None
    # Called on the worker thread with the rows, or with the exception that generation raised.
    deliver: Callable[[list[Row] | BaseException], None] | None = None
    # Streaming requests: called on the worker thread with (row, stable text so far) at each
    # chunk boundary while the row is still being generated.
    on_partial: Callable[[int, str], None] | None = None
    # Set when the client went away: the job is dropped from the queue, and a generation
    # whose jobs are all cancelled stops at the next chunk boundary.
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


class Cancelled(Exception):
    """Every client of a generation went away; it stopped early."""


class Overloaded(Exception):
    """More requests wait than the batcher's `max_queue`: the server answers 503."""


# Decode steps between the checks of a non-streaming generation for clients that left.
CANCEL_CHUNK = 32


class _Once:
    """Logs a warning the first time each kind of problem happens, later ones at debug."""

    def __init__(self):
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str, *args) -> None:
        with self._lock:
            first = kind not in self._seen
            self._seen.add(kind)
        if first:
            log.warning(message + " (further ones are logged at debug level)", *args)
        else:
            log.debug(message, *args)


def _signature(job: Job):
    s = job.sampling
    if s["temperature"] == 0:
        return None
    return (int(s["top_k"]), s["top_p"] < 1.0, s["min_p"] > 0.0)


def _group(jobs: list[Job]) -> list[list[Job]]:
    by_stop: dict[tuple, dict] = {}
    for job in jobs:
        by_stop.setdefault(job.stop, {}).setdefault(_signature(job), []).append(job)
    groups = []
    for sigs in by_stop.values():
        greedy = sigs.pop(None, [])
        rest = list(sigs.values())
        groups.extend([greedy + rest[0], *rest[1:]] if rest else [greedy])
    return groups


def _deliver(job: Job, result) -> None:
    try:
        job.deliver(result)
    except RuntimeError:  # the event loop is gone (server shutting down): nobody is waiting
        log.warning("dropped a result: its event loop is closed")


class Batcher:
    """Collects jobs for a short window and runs them through shared `generate` calls.

    `max_queue`: the most jobs that may wait (None: unbounded); `submit` raises `Overloaded`
    beyond it.

    Attributes:
      calls: number of `generate` calls made; batches: worker rounds; cancelled: generations
        stopped early because their clients left (for monitoring).
    """

    def __init__(self, config, params, tokenizer, *, max_len: int, max_batch_size: int = 16,
                 batch_window_s: float = 0.01, mesh=None, rules="fsdp",
                 max_queue: int | None = None):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.max_queue = max_queue
        self.max_len, self.max_batch_size = max_len, max(1, int(max_batch_size))
        self.window_s, self.mesh, self.rules = float(batch_window_s), mesh, rules
        self.calls = self.batches = self.cancelled = 0
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.once = _Once()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._work, name="align-jax-batcher",
                                                 daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def queued(self) -> int:
        """Jobs waiting for the worker (for monitoring)."""
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        """Queues a job; raises `Overloaded` when `max_queue` jobs are already waiting."""
        if self.max_queue is not None and self.queued() >= self.max_queue:
            raise Overloaded(f"{self.queued()} requests are waiting (max_queue="
                             f"{self.max_queue}); retry later")
        self.start()
        self._queue.put(job)

    async def run(self, job: Job) -> list[Row]:
        """Queues `job` and awaits its rows (raises what generation raised); cancelling the
        awaiting task (the client went away) cancels the job."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result):
            if not future.done():  # the client may have gone away
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

        job.deliver = lambda result: loop.call_soon_threadsafe(settle, result)
        self.submit(job)
        try:
            return await future
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            rows = len(jobs[0].prompts)
            deadline = time.monotonic() + self.window_s
            while rows < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    jobs.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
                rows += len(jobs[-1].prompts)
            live = []
            for job in jobs:
                if job.cancelled.is_set():
                    _deliver(job, Cancelled("the client went away before generation started"))
                else:
                    live.append(job)
            for group in _group(live):
                self._run_group(group)
            self.batches += 1

    def _run_group(self, group: list[Job]) -> None:
        try:
            results = self._generate(group)
        except Cancelled as e:
            for job in group:
                _deliver(job, e)
            return
        except Exception as e:  # noqa: BLE001 - reported to the waiting requests
            if len(group) > 1:
                # Find the culprit: the other requests should not fail with it.
                for job in group:
                    self._run_group([job])
                return
            self.once.warn(f"generation:{type(e).__name__}", "generation failed: %s: %s",
                           type(e).__name__, e)
            _deliver(group[0], e)
            return
        for job, rows in zip(group, results):
            _deliver(job, rows)

    def _generate(self, group: list[Job]) -> list[list[Row]]:
        need = max(j.max_tokens for j in group)
        room = self.max_len - max(len(p) for j in group for p in j.prompts)
        if need > room:  # a long prompt next to a long budget: no shared call fits
            if len(group) == 1:
                raise ValueError(f"prompt + max_tokens exceed the context ({self.max_len})")
            return [r for j in group for r in self._generate([j])]
        budget = max(need, min(max(_MIN_BUDGET, next_pow2(need)), room))
        prompts = [p for j in group for p in j.prompts]
        per_row = {k: [j.sampling[k] for j in group for _ in j.prompts]
                   for k in group[0].sampling}
        self.calls += 1
        row_constraints = [j.constraint for j in group for _ in j.prompts]
        bias = None
        if any(j.logit_bias for j in group):
            bias = np.zeros((len(prompts), self.config.vocab_size), np.float32)
            k = 0
            for j in group:
                for _ in j.prompts:
                    for i, b in (j.logit_bias or {}).items():
                        bias[k, i] = b
                    k += 1
        kwargs = dict(max_new_tokens=budget, **per_row, stop_strings=group[0].stop,
                      tokenizer=self.tokenizer, seeds=[s for j in group for s in j.seeds],
                      mesh=self.mesh, rules=self.rules, max_len=self.max_len,
                      constraint=row_constraints if any(row_constraints) else None,
                      logit_bias=bias)
        out = self._stream(group, prompts, kwargs)
        results, k = [], 0
        for job in group:
            rows = []
            for _ in job.prompts:
                tokens, text, reason = out.tokens[k], out.texts[k], out.finish_reasons[k]
                if len(tokens) > job.max_tokens:
                    tokens = tokens[:job.max_tokens]
                    decode = (self.tokenizer.decode if job.constraint is None else
                              compile_constraint(job.constraint, self.tokenizer).decode)
                    text, reason = decode(tokens), "length"
                scores = None
                if job.logprobs is not None:  # one extra forward pass over prompt + tokens
                    scores = token_scores(self.config, self.params, prompts[k] + list(tokens),
                                          top=job.logprobs, max_len=self.max_len,
                                          mesh=self.mesh, rules=self.rules)
                rows.append(Row(tokens=list(tokens), text=text, finish_reason=reason,
                                scores=scores))
                k += 1
            results.append(rows)
        return results

    def _stream(self, group: list[Job], prompts, kwargs) -> GenerationOutput:
        """`generate`, reporting each streaming row's stable text once per decode chunk."""
        owner = [(job, i) for job in group for i in range(len(job.prompts))]
        done: dict[int, Completion] = {}
        streaming = any(j.on_partial is not None for j in group)

        def cancel() -> bool:
            return all(j.cancelled.is_set() for j in group)

        for c in generate_stream(self.config, self.params, prompts, partial=streaming,
                                 chunk_size=STREAM_CHUNK if streaming else CANCEL_CHUNK,
                                 cancel=cancel, **kwargs):
            if c.finish_reason is not None:
                done[c.index] = c
                continue
            job, row = owner[c.index]
            # Rows past their own max_tokens (the call's budget is rounded up) are cut and
            # re-decoded at the end; their partial text could overshoot, so it is not sent.
            if job.on_partial is not None and len(c.tokens) <= job.max_tokens and c.text:
                try:
                    job.on_partial(row, c.text)
                except RuntimeError:  # the event loop is gone: nobody is listening
                    pass
        if len(done) < len(prompts):
            self.cancelled += 1
            raise Cancelled("every client of this generation went away")
        order = [done[i] for i in range(len(prompts))]
        return GenerationOutput(tokens=[c.tokens for c in order],
                                logprobs=[c.logprobs for c in order],
                                finish_reasons=[c.finish_reason for c in order],
                                texts=[c.text for c in order])
