"""Continuous batching for the HTTP server: `Batcher`'s interface over `continuous.Engine`.

One worker thread owns the engine: it compiles the engine's shapes once at start (every prompt
bucket up to the longest accepted prompt), then loops: take newly submitted jobs, one engine
`step` (free rows refilled, one decode chunk), repeat. Each prompt of a job is one row; the
job is answered when its last row finishes. Streaming rows report their stable text every
`continuous.STREAM_CHUNK` tokens.

Requests the rows do not serve (a constraint, or prompt log-probs) go to a windowed
`serving.Batcher` running beside it, which runs them through `generate` as before.
Overload: with more than `max_queue` jobs waiting, `submit` raises `Overloaded` (the server
answers 503 with Retry-After), so memory stays bounded.
"""

from __future__ import annotations

import dataclasses
import queue
import threading

from align_jax.generate import continuous as continuous_lib
from align_jax.generate.serving import Batcher, Cancelled, Job, Overloaded, Row, _deliver, _Once


@dataclasses.dataclass(frozen=True, kw_only=True)
class Queueing:
    """How the server queues and batches requests.

    continuous: fixed decode rows (max_batch_size of them) refilled between decode chunks
      (`RowBatcher`); False: the batch window (`serving.Batcher`), one `generate` per group.
    max_queue: requests that may wait before the server answers 503 with Retry-After (None:
      unbounded).
    chunk: decode steps between the row checks of non-streaming rows (continuous only).
    retry_after_s: the Retry-After the 503 carries.
    """

    continuous: bool = True
    max_queue: int | None = 256
    chunk: int = continuous_lib.DEFAULT_CHUNK
    retry_after_s: int = 1


class RowBatcher:
    """The server's batcher with continuous batching (`serving.Batcher`'s interface).

    Attributes:
      engine: the `continuous.Engine`; fallback: the `serving.Batcher` for constrained and
        log-prob requests; calls: jobs started on the rows; batches: engine chunks;
        cancelled: rows freed because their client left.
    """

    def __init__(self, config, params, tokenizer, *, max_len: int, max_batch_size: int = 16,
                 max_queue: int | None = None, warm_prompt: int | None = None,
                 chunk: int = continuous_lib.DEFAULT_CHUNK, fallback: Batcher | None = None):
        spec = continuous_lib.EngineConfig(rows=max(1, int(max_batch_size)), max_len=int(max_len),
                                           chunk=int(chunk))
        self.engine = continuous_lib.Engine(config, params, tokenizer, engine=spec)
        self.fallback = fallback or Batcher(config, params, tokenizer, max_len=max_len,
                                            max_batch_size=max_batch_size)
        self.max_queue = max_queue
        self.warm_prompt = warm_prompt
        self.once = _Once()
        self.calls = 0
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.ready = threading.Event()

    @property
    def batches(self) -> int:
        return self.engine.chunks

    @property
    def cancelled(self) -> int:
        return self.engine.cancelled

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._work, name="align-jax-rows",
                                                daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.fallback.stop()

    def queued(self) -> int:
        """Jobs and rows waiting for a free row (for monitoring and the overload limit)."""
        return self._inbox.qsize() + len(self.engine.queue) + self.fallback.queued()

    def submit(self, job: Job) -> None:
        if self.max_queue is not None and self.queued() >= self.max_queue:
            raise Overloaded(f"{self.queued()} requests are waiting (max_queue="
                             f"{self.max_queue}); retry later")
        if job.constraint is not None or job.logprobs is not None:
            self.fallback.submit(job)
            return
        self.start()
        self._inbox.put(job)

    async def run(self, job: Job) -> list[Row]:
        """Queues `job` and awaits its rows (as `serving.Batcher.run`)."""
        return await Batcher.run(self, job)

    # -- the worker -----------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self.engine.warm(self.warm_prompt)
        finally:
            self.ready.set()
        while not self._stop.is_set():
            self._take()
            if not self.engine.busy():
                try:
                    self._admit(self._inbox.get(timeout=0.1))
                except queue.Empty:
                    pass
                continue
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001 - reported to every running request
                self.once.warn(f"generation:{type(e).__name__}", "generation failed: %s: %s",
                               type(e).__name__, e)
                self._fail_all(e)

    def _take(self) -> None:
        while True:
            try:
                self._admit(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            _deliver(job, Cancelled("the client went away before generation started"))
            return
        tracker = _JobRows(job)
        try:
            reqs = [self.engine.validate(continuous_lib.RowRequest(
                prompt=p, max_tokens=job.max_tokens, settings=dict(job.sampling),
                seed=job.seeds[i], logit_bias=job.logit_bias, stop=tuple(job.stop), index=i,
                on_done=tracker.done, cancelled=job.cancelled.is_set,
                on_partial=None if job.on_partial is None else tracker.partial))
                for i, p in enumerate(job.prompts)]
        except ValueError as e:
            _deliver(job, e)
            return
        self.calls += 1
        self.engine.queue.extend(reqs)

    def _fail_all(self, error: BaseException) -> None:
        """A failed step leaves the device state unknown: every row and queued job fails
        with the error and the engine starts over with free rows."""
        for slot in self.engine.slots:
            if slot is not None and slot.req.on_done is not None:
                slot.req.on_done(error)
        for req in self.engine.queue:
            if req.on_done is not None:
                req.on_done(error)
        self.engine.reset()


class _JobRows:
    """Collects one job's rows and answers it when the last one finishes (or the first
    fails)."""

    def __init__(self, job: Job):
        self.job = job
        self.rows: list[Row | None] = [None] * len(job.prompts)
        self.failed = False

    def done(self, c) -> None:
        if self.failed:
            return
        if isinstance(c, BaseException):
            self.failed = True
            self.job.cancelled.set()  # its other rows stop at the next chunk
            _deliver(self.job, c)
            return
        self.rows[c.index] = Row(tokens=list(c.tokens), text=c.text or "",
                                 finish_reason=c.finish_reason)
        if all(r is not None for r in self.rows):
            _deliver(self.job, list(self.rows))

    def partial(self, c) -> None:
        if c.text:
            try:
                self.job.on_partial(c.index, c.text)
            except RuntimeError:  # the event loop is gone: nobody is listening
                pass
