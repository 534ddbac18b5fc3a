"""The host side of continuous batching: a queue of row requests and a fixed set of device rows.

    submit(RowRequest) --queue--> step(): free rows take the oldest requests (`rows.jit_insert`),
      every live row decodes `chunk` steps (`rows.jit_decode`, one host sync), then each row is
      checked: stop token, budget, stop string, a client that left; a finished row is freed
      and its request gets its Completion; streaming requests get their stable text so far.

A short request sent while long ones run waits at most one chunk and its own prefill, not the
long ones. Shapes are fixed (rows, cache slots, the prompt buckets, three sampler programs),
so after `warm` nothing compiles again: `loop.trace_counts()` counts "rows_insert" and
"rows_decode" traces.

Served per row: temperature, top_k, top_p, min_p, repetition/presence/frequency penalties,
logit bias, a seed, stop strings (host), the stop token set (engine-wide). Not served here:
constraints, scored continuations and prompt log-probs (callers route those through
`generate`).
"""

import collections
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.generate import batch_inputs, prompt_batches, results, rows, sampling, stop
from align_jax.generate.results import Completion
from align_jax.models.config import ModelConfig

DEFAULT_CHUNK = 8
# Decode steps between host checks while a streaming request is running: each token (pair)
# reaches its client as it is decoded.
STREAM_CHUNK = 2


@dataclasses.dataclass(kw_only=True)
class RowRequest:
    """One prompt to continue.

    prompt: token ids; max_tokens: its budget; settings: sampling settings by name
      (`sampling.settings_arrays`; missing ones neutral); seed, salt: its key is
      fold_in(key(seed), salt), as `generate` builds it (seeds=, or seed= with salt = index).
    logit_bias: {token id: bias} or None; stop: stop strings (need the engine's tokenizer).
    on_done: called with the finished Completion, or the exception that ended the row.
    on_partial: streaming: called with a partial Completion (stable text) after each chunk.
    cancelled: polled at each chunk; True frees the row (on_done is not called).
    index: reported as Completion.index.
    """

    prompt: Sequence[int]
    max_tokens: int
    settings: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    salt: int = 0
    logit_bias: dict[int, float] | None = None
    stop: tuple[str, ...] = ()
    on_done: Callable[[Completion | BaseException], None] | None = None
    on_partial: Callable[[Completion], None] | None = None
    cancelled: Callable[[], bool] | None = None
    index: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """rows: decode rows (the batch); max_len: cache slots per row (prompt + max_tokens must
    fit); chunk: decode steps between host checks (STREAM_CHUNK while a row streams);
    min_bucket: the shortest prompt bucket; stop_token_ids, ignore_eos: the stop set
    (`batch_inputs.stop_set`)."""

    rows: int = 8
    max_len: int = 1024
    chunk: int = DEFAULT_CHUNK
    min_bucket: int = prompt_batches.MIN_BUCKET
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


class Engine:
    """Continuous batching over one model (single-threaded: one caller drives `step`).

    Attributes:
      inserts, chunks, cancelled: counters for monitoring.
    """

    def __init__(self, config: ModelConfig, params, tokenizer=None, *,
                 engine: EngineConfig = EngineConfig()):
        if engine.rows < 1 or engine.max_len < 2:
            raise ValueError(f"engine: rows={engine.rows} must be >= 1 and max_len="
                             f"{engine.max_len} >= 2")
        self.config, self.tokenizer, self.spec = config, tokenizer, engine
        self.params = jax.device_put(params)
        self.stop_ids = jax.device_put(batch_inputs.stop_set(
            config, tokenizer, engine.stop_token_ids, engine.ignore_eos))
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.state = rows.init_state(config, rows=engine.rows, cache_len=engine.max_len)
        self.slots: list[_Slot | None] = [None] * engine.rows
        self.queue: collections.deque[RowRequest] = collections.deque()
        self.inserts = self.chunks = self.cancelled = 0

    def reset(self) -> None:
        """Forgets every row and queued request (after a failed step: the donated state is
        gone); the compiled programs stay."""
        self.state = rows.init_state(self.config, rows=self.spec.rows,
                                     cache_len=self.spec.max_len)
        self.slots = [None] * self.spec.rows
        self.queue.clear()

    # -- shapes ---------------------------------------------------------------------------

    def bucket(self, n: int) -> int:
        """Prompt slots a prompt of n tokens is padded to."""
        return prompt_batches.bucket_length(n, cap=self.spec.max_len,
                                            min_bucket=self.spec.min_bucket)

    def buckets(self, longest: int | None = None) -> list[int]:
        """Every bucket a prompt of up to `longest` tokens (default max_len - 1) can get."""
        longest = self.spec.max_len - 1 if longest is None else int(longest)
        out, n = [], 1
        while n <= longest:
            b = self.bucket(n)
            out.append(b)
            n = b + 1
        return out

    def warm(self, longest_prompt: int | None = None) -> None:
        """Compiles every insert bucket up to `longest_prompt` and every decode program, by
        running them once on a throwaway request (the rows are left free)."""
        for p in self.buckets(longest_prompt):
            self._insert(0, RowRequest(prompt=[self.pad_id] * p, max_tokens=1))
        for flags in rows.VARIANTS:
            self.state = rows.jit_decode(self.params, self.state, self.stop_ids, jnp.int32(1),
                                         config=self.config, flags=flags)
        self.state = rows.jit_release(self.state, jnp.ones((self.spec.rows,), bool))

    # -- requests -------------------------------------------------------------------------

    def validate(self, req: RowRequest) -> RowRequest:
        """Checks a request (ValueError naming the field); returns it with a clean prompt."""
        if isinstance(req.max_tokens, bool) or int(req.max_tokens) < 1:
            raise ValueError(f"max_tokens must be a positive int, got {req.max_tokens!r}")
        prompt = [int(t) for t in req.prompt]
        if not prompt:
            raise ValueError("prompt is empty; generation needs at least one token")
        if len(prompt) + int(req.max_tokens) > self.spec.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({req.max_tokens}) "
                             f"exceed the context ({self.spec.max_len})")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt has token id {bad[0]} outside "
                             f"[0, {self.config.vocab_size})")
        stop.validate_stop_strings(req.stop, self.tokenizer)
        sampling.settings_arrays(1, **req.settings)
        return dataclasses.replace(req, prompt=prompt, max_tokens=int(req.max_tokens),
                                   stop=tuple(req.stop))

    def submit(self, req: RowRequest) -> None:
        """Queues a request (validated now; it runs as `step` reaches it)."""
        self.queue.append(self.validate(req))

    def busy(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self.queue) or any(s is not None for s in self.slots)

    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def run(self) -> None:
        """Steps until every submitted request has finished."""
        while self.busy():
            self.step()

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> None:
        """Fills free rows from the queue, decodes one chunk, reports and frees rows."""
        self._fill()
        live = [r for r, s in enumerate(self.slots) if s is not None]
        if not live:
            return
        flags = rows.variant([self.slots[r].needs for r in live])
        streaming = any(self.slots[r].req.on_partial is not None for r in live)
        steps = min(self.spec.chunk, STREAM_CHUNK) if streaming else self.spec.chunk
        self.state = rows.jit_decode(self.params, self.state, self.stop_ids, jnp.int32(steps),
                                     config=self.config, flags=flags)
        self.chunks += 1
        # The one host sync per chunk.
        step_B, done_B, stopped_B, tokens_BM, logprobs_BM = jax.device_get(
            (self.state.step_B, self.state.done_B, self.state.stopped_B, self.state.tokens_BM,
             self.state.logprobs_BM))
        freed = np.zeros((self.spec.rows,), bool)
        for r in live:
            slot = self.slots[r]
            n = int(step_B[r])
            if slot.req.cancelled is not None and slot.req.cancelled():
                self.cancelled += 1
                freed[r] = True
                continue
            try:
                outcome = self._row_result(slot, tokens_BM[r, :n], logprobs_BM[r, :n],
                                           bool(done_B[r]), bool(stopped_B[r]))
            except FloatingPointError as e:
                outcome = e
            if outcome is None:
                continue
            freed[r] = True
            if slot.req.on_done is not None:
                slot.req.on_done(outcome)
        for r in np.flatnonzero(freed):
            self.slots[r] = None
        if freed.any() and not done_B[freed].all():
            self.state = rows.jit_release(self.state, jnp.asarray(freed))

    def _row_result(self, slot, toks, lps, done: bool, stopped: bool):
        """The row's Completion when it finished (None otherwise; a partial is sent)."""
        req = slot.req
        if not np.all(np.isfinite(lps)):
            raise FloatingPointError(
                f"generation produced non-finite logits at new token "
                f"{int(np.argmin(np.isfinite(lps)))}: the model's weights (or its config) hold "
                "NaN or inf")
        common = dict(index=req.index, tokens=[int(t) for t in toks],
                      logprobs=[float(x) for x in lps])
        cut = stop.cut_at_stop(toks, slot.decode, req.stop) if req.stop else None
        if cut is not None:
            m, text = cut
            common.update(tokens=common["tokens"][:m], logprobs=common["logprobs"][:m])
            return Completion(**common, finish_reason="stop", text=text)
        if done:
            text = None if slot.decode is None else slot.decode(toks[:-1] if stopped else toks)
            return Completion(**common, finish_reason="stop" if stopped else "length",
                              text=text)
        if req.on_partial is not None:
            req.on_partial(Completion(**common, finish_reason=None, text=results._stable_text(
                slot.decode, toks, req.stop)))
        return None

    def _fill(self) -> None:
        for r in range(self.spec.rows):
            if self.slots[r] is not None:
                continue
            while self.queue:
                req = self.queue.popleft()
                if req.cancelled is not None and req.cancelled():
                    self.cancelled += 1
                    continue
                self._insert(r, req)
                self.slots[r] = _Slot(req=req, needs=rows.row_needs(req.settings,
                                                                     req.logit_bias),
                                      decode=results.row_decoder(self.tokenizer, None))
                break

    def _insert(self, row: int, req: RowRequest) -> None:
        n = len(req.prompt)
        tokens_1T = np.full((1, self.bucket(n)), self.pad_id, np.int32)
        tokens_1T[0, :n] = req.prompt
        sampler_1, _ = sampling.make_sampling(1, seeds=[req.seed], salts=[req.salt],
                                              **req.settings)
        bias_1V = np.zeros((1, self.config.vocab_size), np.float32)
        for t, b in (req.logit_bias or {}).items():
            bias_1V[0, int(t)] = float(b)
        sampler_1 = sampler_1.replace(logit_bias_BV=jnp.asarray(bias_1V))
        self.state = rows.jit_insert(self.params, self.state, jnp.asarray(tokens_1T),
                                     jnp.int32(n), jnp.int32(row), sampler_1,
                                     jnp.int32(req.max_tokens), self.stop_ids,
                                     config=self.config)
        self.inserts += 1


@dataclasses.dataclass
class _Slot:
    req: RowRequest
    needs: sampling.SamplingFlags
    decode: Callable | None


def generate_rows(engine: Engine, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  settings: dict | None = None, seeds: Sequence[int] | None = None,
                  seed: int = 0, stop_strings: Sequence[str] = ()) -> list[Completion]:
    """All prompts through the engine (the rows refill as prompts finish); Completions in
    prompt order. Keys as `generate` makes them: seeds[i] (salt 0), or seed salted by i."""
    out: dict[int, Completion | BaseException] = {}
    for i, p in enumerate(prompts):
        engine.submit(RowRequest(
            prompt=p, max_tokens=max_new_tokens, settings=dict(settings or {}),
            seed=int(seeds[i]) if seeds is not None else int(seed),
            salt=0 if seeds is not None else i, stop=tuple(stop_strings), index=i,
            on_done=lambda c, i=i: out.__setitem__(i, c)))
    try:
        engine.run()
    except BaseException:
        engine.reset()  # the donated state of a failed step is gone
        raise
    errors = [c for c in out.values() if isinstance(c, BaseException)]
    if errors:
        raise errors[0]
    return [out[i] for i in range(len(prompts))]
