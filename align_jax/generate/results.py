"""What a batch's rows become on the host: `Completion`s, and the call's `GenerationOutput`.

After each decode chunk the loop fetches the batch's tokens, log-probs and flags once;
`chunk_results` turns the rows that finished (a stop token, a stop string found in the text,
the budget, an automaton with no allowed token) into Completions, and the unfinished ones
into partial Completions for streaming. Texts exclude the token or string that ended a row.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from align_jax.generate import continuations as continuations_lib
from align_jax.generate import prefix as prefix_lib
from align_jax.generate import prompt_batches, stop


@dataclasses.dataclass(frozen=True, kw_only=True)
class Completion:
    """One prompt's result, as `generate_stream` yields it.

    finish_reason is None for a partial result (`partial=True`): the tokens so far, and as
    text only what can no longer change (no half-decoded character, nothing that could still
    turn into a stop string). incomplete: a constrained row that ended before its automaton
    accepted (its text does not match the constraint). shared_prefix_tokens: how many of the
    prompt's tokens the prefill took from its batch's shared prefix pass
    (`align_jax.generate.prefix`; 0 when the batch ran unshared).
    """

    index: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None
    text: str | None = None
    continuation_logps: tuple[float, ...] | None = None
    incomplete: bool = False
    shared_prefix_tokens: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationOutput:
    """Results in the order of the prompts. texts is None without a tokenizer;
    continuation_logps is None unless continuations were given to score; incomplete is None
    unless a constraint was given (then True for a constrained row that ended before its
    automaton accepted, e.g. finish_reason "length"); shared_prefix_tokens as in
    `Completion` (None where the caller built the output without it)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    texts: list[str] | None = None
    continuation_logps: list[tuple[float, ...]] | None = None
    incomplete: list[bool] | None = None
    shared_prefix_tokens: list[int] | None = None


def row_decoder(tokenizer, compiled):
    """ids -> text for one row: a constrained row's text is the bytes its automaton read."""
    if compiled is not None:
        return compiled.decode
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode([int(t) for t in ids])


def check_finite(logprobs_BM, lengths_B, rows, indices) -> None:
    """Non-finite log-probs mean NaN/inf logits: an error, not empty completions."""
    for row in sorted(rows):
        lps = logprobs_BM[row, :int(lengths_B[row])]
        if not np.all(np.isfinite(lps)):
            at = int(np.argmin(np.isfinite(lps)))
            raise FloatingPointError(
                f"generation produced non-finite logits for prompt {indices[row]} at new token "
                f"{at}: the model's weights (or its config) hold NaN or inf")


def _stable_text(decode, toks, stop_strings) -> str | None:
    if decode is None:
        return None
    text = decode(toks).rstrip("\ufffd")
    # Hold back a tail that is the start of a stop string: it may yet be cut.
    hold = max((k for s in stop_strings for k in range(1, len(s))
                if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold]


def _constrained_end(accepting_Q, compiled, state: int, reason: str, *, dead: bool = False,
                     text: str | None = None) -> tuple[str, bool]:
    """(finish reason, incomplete) of a row that ended in automaton `state`."""
    if compiled is None:
        return reason, False
    if text is not None:  # cut at a stop string: the cut text decides
        return reason, not compiled.constraint.validate(text)
    accepted = bool(accepting_Q[state])
    if dead:  # no allowed token was left (the loop's _record): complete if it accepts
        reason = "stop" if accepted else "length"
    return reason, not accepted


def chunk_results(batch: prompt_batches.PromptBatch, pending: set[int], fetched, *,
                  max_new_tokens: int, decoders: Sequence, compiled: Sequence,
                  accepting_Q, stop_strings: Sequence[str], cont, partial: bool
                  ) -> tuple[list[Completion], list[int]]:
    """The Completions of one chunk, for the rows still pending, in row order.

    Args:
      batch: the batch; pending: its rows not yet reported as finished (updated in place:
        finished rows are removed).
      fetched: host copies (step, done_B, stopped_B, lengths_B, tokens_BM, logprobs_BM,
        continuation scores_BK or None, constraint states or None) after the chunk.
      max_new_tokens: the budget; decoders, compiled: per row, its text decoder (or None)
        and compiled constraint (or None); accepting_Q: the call's accepting states (or
        None without constraints).
      stop_strings, cont, partial: the call's stop strings, scored continuations and
        whether unfinished rows are reported too.
    Returns:
      (Completions: finished rows, and with `partial` the unfinished ones (finish_reason
      None); rows that ended on a stop string the device does not know about yet).
    """
    step, done_B, stopped_B, lengths_B, tokens_BM, logprobs_BM, scores_BK, cstate_B = fetched
    check_finite(logprobs_BM, lengths_B, pending, batch.indices)
    out, newly_done = [], []
    for row in sorted(pending):
        n = int(lengths_B[row])
        toks, lps = tokens_BM[row, :n], logprobs_BM[row, :n]
        decode, index = decoders[row], batch.indices[row]
        common = dict(index=index, tokens=[int(t) for t in toks],
                      logprobs=[float(x) for x in lps],
                      shared_prefix_tokens=prefix_lib.shared_tokens(batch, row))
        cut = stop.cut_at_stop(toks, decode, stop_strings) if stop_strings else None
        cs = int(cstate_B[row]) if cstate_B is not None else 0
        if cut is not None:
            m, text = cut
            reason, incomplete = _constrained_end(accepting_Q, compiled[row], cs, "stop",
                                                  text=text)
            common.update(tokens=common["tokens"][:m], logprobs=common["logprobs"][:m])
            newly_done.append(row)
        elif done_B[row] or step >= max_new_tokens:
            stopped = bool(done_B[row] and stopped_B[row])
            reason, incomplete = _constrained_end(
                accepting_Q, compiled[row], cs, "stop" if stopped else "length",
                dead=bool(done_B[row]) and not stopped)
            text = None if decode is None else decode(toks[:-1] if stopped else toks)
        else:
            if partial:
                out.append(Completion(**common, finish_reason=None,
                                      text=_stable_text(decode, toks, stop_strings)))
            continue
        pending.discard(row)
        out.append(Completion(**common, finish_reason=reason, text=text, incomplete=incomplete,
                              continuation_logps=continuations_lib.row_scores(
                                  cont, scores_BK, batch, row)))
    return out, newly_done
