"""The aligner squad: inspectors score responses per criterion, aligners rewrite the weak ones.

`squad` follows the paper ("Aligners: Decoupling LLMs and Alignment"): every row is scored by
every inspector; the aligners run in order of ascending mean inspector score over the batch
(computed once, from the initial responses); each aligner rewrites only the rows whose current
score for its criterion is strictly below the threshold; every inspector re-scores after each
stage. Inspectors and aligners are plain callables, so scripted stand-ins and real models plug
in the same way (`inspectors.make_inspector` and `align` wrap the real ones).
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from align_jax.data.aligner_text import DONE, marker_ids, prompt_ids
from align_jax.generate import generate

Inspector = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
Aligner = Callable[[Sequence[str], Sequence[str]], Sequence[str]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One aligner's pass over the batch.

    Attributes:
      criterion: the aligner's criterion.
      rows: indices of the rows it rewrote (score strictly below the threshold).
      scores_before, scores_after: criterion -> per-row scores before and after this stage.
    """

    criterion: str
    rows: tuple[int, ...]
    scores_before: dict[str, np.ndarray]
    scores_after: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SquadResult:
    """What the squad did.

    Attributes:
      responses: the final responses, in input order.
      order: the criteria in the order their aligners ran.
      initial_scores, final_scores: criterion -> per-row scores.
      stages: one Stage per aligner, in order.
      applied: per row, the criteria whose aligners rewrote it, in order.
    """

    responses: list[str]
    order: tuple[str, ...]
    initial_scores: dict[str, np.ndarray]
    final_scores: dict[str, np.ndarray]
    stages: tuple[Stage, ...]
    applied: list[tuple[str, ...]]

    def trace(self, row: int) -> list[dict]:
        """Per-stage record of one row: criterion, whether it ran, scores before and after."""
        return [{"criterion": s.criterion, "ran": row in s.rows,
                 "before": {c: float(v[row]) for c, v in s.scores_before.items()},
                 "after": {c: float(v[row]) for c, v in s.scores_after.items()}}
                for s in self.stages]


def _score_all(inspectors: Mapping[str, Inspector], inputs, responses) -> dict[str, np.ndarray]:
    out = {}
    for criterion, inspect in inspectors.items():
        scores = np.asarray(inspect(list(inputs), list(responses)), dtype=np.float64)
        if scores.shape != (len(inputs),):
            raise ValueError(f"inspector {criterion!r} returned shape {scores.shape} for "
                             f"{len(inputs)} rows")
        out[criterion] = scores
    return out


def squad(inputs: Sequence[str], responses: Sequence[str], *,
          inspectors: Mapping[str, Inspector], aligners: Mapping[str, Aligner],
          threshold: float = 0.5) -> SquadResult:
    """Runs the aligner squad over a batch of (input, response) rows.

    Args:
      inputs: the prompts x.
      responses: the responses y to correct, one per input.
      inspectors: criterion -> callable(inputs, responses) -> scores in [0, 1] (P(aligned)).
      aligners: criterion -> callable(inputs, responses) -> new responses. Every aligner needs
        an inspector of the same criterion.
      threshold: a row is rewritten when its current score is strictly below this.
    Returns:
      SquadResult (final responses in input order, the order, and the per-stage trace).
    """
    inputs, current = list(inputs), list(responses)
    if len(inputs) != len(current):
        raise ValueError(f"squad: {len(inputs)} inputs but {len(current)} responses")
    missing = [c for c in aligners if c not in inspectors]
    if missing:
        raise ValueError(f"squad: aligner {missing[0]!r} has no inspector of its criterion")
    initial = _score_all(inspectors, inputs, current)
    # Stable sort: criteria with equal mean keep the order the aligners were given in.
    order = tuple(sorted(aligners, key=lambda c: float(np.mean(initial[c])) if inputs else 0.0))
    scores, stages = initial, []
    applied: list[list[str]] = [[] for _ in inputs]
    for criterion in order:
        rows = tuple(int(i) for i in np.flatnonzero(scores[criterion] < threshold))
        new = current
        if rows:
            rewritten = list(aligners[criterion]([inputs[i] for i in rows],
                                                 [current[i] for i in rows]))
            if len(rewritten) != len(rows):
                raise ValueError(f"aligner {criterion!r} returned {len(rewritten)} responses "
                                 f"for {len(rows)} rows")
            new = list(current)
            for i, text in zip(rows, rewritten):
                new[i] = text
                applied[i].append(criterion)
        after = _score_all(inspectors, inputs, new)
        stages.append(Stage(criterion=criterion, rows=rows, scores_before=scores,
                            scores_after=after))
        current, scores = new, after
    return SquadResult(responses=current, order=order, initial_scores=initial,
                       final_scores=scores, stages=tuple(stages),
                       applied=[tuple(a) for a in applied])


def align(config, params, tokenizer, inputs: Sequence[str], responses: Sequence[str], *,
          max_new_tokens: int = 256, mesh=None, batch_size: int | None = None) -> list[str]:
    """Aligned responses: greedy from `[INPUT] x [INIT] y [ALIGNED]`, cut at [DONE], EOS or the
    budget.

    Args:
      config, params, tokenizer: a trained aligner (its tokenizer has the markers).
      inputs, responses: the (x, y) rows.
      max_new_tokens: the budget.
      mesh: optional device mesh for generation.
      batch_size: rows decoded together (default: generate's).
    Returns:
      y' per row, stripped.
    """
    if len(inputs) != len(responses):
        raise ValueError(f"align: {len(inputs)} inputs but {len(responses)} responses")
    if not inputs:
        return []
    done = marker_ids(tokenizer)[DONE]
    prompts = [prompt_ids(tokenizer, x, y) for x, y in zip(inputs, responses)]
    out = generate(config, params, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                   stop_token_ids=(done,), tokenizer=tokenizer, mesh=mesh,
                   batch_size=batch_size)
    stops = {done, *tokenizer.eos_ids}
    texts = []
    for ids in out.tokens:
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        texts.append(tokenizer.decode(ids[:cut]).strip())
    return texts
