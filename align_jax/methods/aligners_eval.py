"""The aligners' own evaluation, as the aligners paper measures them.

The inspector pass rates of the squad report are scored by the same inspectors that choose
which rows the aligners rewrite, so they cannot tell whether a rewrite is better. Here:
  ablation   every aligner applied to every row, without the inspectors deciding (the paper's
             first setting, "individual aligners"), with the inspector pass rates after it;
  win rates  an external judge (any Teacher, or a letters judge) compares each setting's
             final responses with the original ones, both orders of every pair, with the
             judge's position bias and length controls (`eval.judge.pairwise_win_rate`), as
             the paper reports win rates of y' over y (AlpacaEval's GPT-4, PairRM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from align_jax.eval.judge import pairwise_win_rate
from align_jax.methods.aligners import Aligner, Inspector

DEFAULT_RUBRIC = ("Which response is the better answer to the instruction: helpful, factually "
                  "correct and ethical?")


def ablation(inputs: Sequence[str], responses: Sequence[str], *,
             aligners: Mapping[str, Aligner], inspectors: Mapping[str, Inspector]
             ) -> dict[str, dict]:
    """Each aligner on every row (no inspector decides), then every inspector's scores.

    Returns:
      {criterion: {"responses": the aligned responses, "scores": {inspector criterion:
      per-row scores}}}.
    """
    inputs, responses = list(inputs), list(responses)
    out = {}
    for criterion, align in aligners.items():
        new = list(align(inputs, responses)) if inputs else []
        if len(new) != len(inputs):
            raise ValueError(f"aligner {criterion!r} returned {len(new)} responses for "
                             f"{len(inputs)} rows")
        scores = {c: np.asarray(inspect(inputs, new), np.float64) if inputs else np.zeros(0)
                  for c, inspect in inspectors.items()}
        out[criterion] = {"responses": new, "scores": scores}
    return out


def pass_rates(scores: Mapping[str, Sequence[float]], *, threshold: float) -> dict[str, float]:
    """Per criterion, the share of rows scored >= threshold (nan with no rows)."""
    return {c: float(np.mean(np.asarray(s) >= threshold)) if len(s) else float("nan")
            for c, s in scores.items()}


def judge_settings(inputs: Sequence[str], originals: Sequence[str],
                   settings: Mapping[str, Sequence[str]], *, judge,
                   template: str = "pairwise", rubric: str = DEFAULT_RUBRIC, seed: int = 0,
                   max_tokens: int | None = None) -> dict[str, dict]:
    """Win rate of each setting's responses over the original responses.

    Args:
      inputs, originals: the rows' instructions and the responses the aligners corrected.
      settings: setting name -> its final response per row ("squad", "ablation:ethical"...).
      judge: any Teacher or a LetterJudge.
      template, rubric, seed, max_tokens: as `eval.judge.pairwise_win_rate`.
    Returns:
      {setting: WinRateResult.summary() plus "rows_changed": rows whose response differs}.
    """
    out = {}
    for name, responses in settings.items():
        res = pairwise_win_rate(list(inputs), list(responses), list(originals), judge=judge,
                                template=template, rubric=rubric, seed=seed,
                                max_tokens=max_tokens)
        out[name] = {**res.summary(),
                     "rows_changed": sum(a != b for a, b in zip(responses, originals))}
    return out


def _num(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(*, criteria: Sequence[str], squad_pass: Mapping[str, float],
             ablation_pass: Mapping[str, Mapping[str, float]],
             win_rates: Mapping[str, dict] | None, judge: str | None,
             template: str | None) -> list[str]:
    """The report section: per setting (the squad, each aligner on every row), the rows
    changed, the inspector pass rates after it and the judged win rate over the originals."""
    lines = ["## Aligned vs original: each setting judged", "",
             "squad = the inspectors choose the rows and the order (the pass rates above); "
             "ablation:<criterion> = that aligner rewrites every row, no inspector decides. "
             "Pass rates are the inspectors' (which also chose the squad's rows); the win rate "
             "of the final responses over the originals is an external judge's"
             + (f" ({judge}, template {template}): both orders of every pair; +- se; LC reg. = "
                "length-controlled by regression; LC strat. = the mean over rows where the "
                "aligned response is longer and where it is not; position bias = share of "
                "pairs whose two orders chose the same slot; parse = unread verdicts, "
                "\"constrained\" when the judge wrote them under the template's verdict regex."
                if judge else
                " (no judge given: `judge=` for win rates)."), ""]
    head = ["setting", "rows changed"] + [f"pass: {c}" for c in criteria]
    head += ["win rate vs original", "LC reg.", "LC strat.", "position bias", "parse"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    settings = {"squad": squad_pass, **{f"ablation:{c}": p for c, p in ablation_pass.items()}}
    for name, passes in settings.items():
        w = (win_rates or {}).get(name)
        cells = [name, str(w["rows_changed"]) if w else "-"]
        cells += [_num(passes.get(c)) for c in criteria]
        if w:
            cells += [f"{_num(w['win_rate'])} +- {_num(w['stderr'])}", _num(w["lc_win_rate"]),
                      _num(w["lc_stratified"]), _num(w["position_bias"], ".2f"),
                      f"{w['parse_failures']}/{w['n_judgements']}"
                      + (" (constrained)" if w.get("constraint") else "")]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
