"""Pairwise LLM judge: win rates of one system over another, with position and length control.

Every pair of responses is judged twice, once in each order (A|B and B|A), by any `Teacher`
(`local:` checkpoint or `openai:` endpoint) under an editable rubric template from
configs/judge_templates/ (or a path). The judge must end with "[RESULT] A" or "[RESULT] B";
anything else is a tie (scored 0.5), counted in `parse_failures` and kept in `judgements`.
A `LetterJudge` (`align_jax.eval.letter_judge`: a small local model read from its
probabilities of "A" and "B") gives soft judgements instead: P(slot A) for system A's slot.

Statistics (all for system A over system B; a pair's score is the mean of its two
judgements, each 1 for A, 0 for B, 0.5 for a tie, or the letter judge's probability):
  win_rate        mean pair score; `stderr` its standard error over pairs, `ci` the normal
                  95% interval clipped to [0, 1].
  position_bias   the share of pairs (both verdicts parsed) whose two orders chose the same
                  slot: a judge that always answers "A" has 1, a consistent judge 0.
  lc_win_rate     length-controlled by regression: the judgement scores regressed (least
                  squares) on tanh(length difference / its root mean square) and read at zero
                  difference. tanh keeps a few very long answers from setting the slope.
  lc_stratified   the SAMI paper's control: the mean of the win rate over pairs where A is
                  longer and the win rate over pairs where A is not longer (nan when one
                  stratum is empty).
Lengths are whitespace-separated words.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from align_jax.sdg.teacher import Teacher, ask
from align_jax.sdg.templates import Template, parse_template

JUDGE_TEMPLATE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs", "judge_templates")
DEFAULT_RUBRIC = ("Which response answers the instruction more correctly and helpfully, "
                  "agreeing with the reference answer and the values it expresses?")
_RESULT = re.compile(r"\[\s*RESULT\s*\]\s*[:=\-]?\s*[\(\"'*]*\s*(?:response\s+)?([AB])\b",
                     re.IGNORECASE)
_BARE = re.compile(r"^\W*(?:response\s+|output\s+)?\(?([AB])\)?\W*$", re.IGNORECASE)
# A letter opening the answer and closed by ")", "." or ":" ("B. It cites the code ...").
_LEAD = re.compile(r"^\W*(?:response\s+)?\(?([AB])(?:\)|\.(?!\w)|:)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WinRateResult:
    """Judged win rate of system A over system B (see the module docstring)."""
    win_rate: float
    stderr: float
    ci: tuple[float, float]
    n_pairs: int
    position_bias: float
    position_bias_pairs: int
    parse_failures: int
    n_judgements: int
    lc_win_rate: float
    lc_stratified: float
    a_longer_share: float
    # Per pair: {"scores": (order AB, order BA) as scores for A, "verdicts": the slots
    # chosen or None, "raw": the judge's two texts}.
    judgements: tuple[dict, ...] = ()

    def summary(self) -> dict:
        """The statistics without the per-pair judgements (for JSON reports)."""
        d = dataclasses.asdict(self)
        d.pop("judgements")
        d["ci"] = list(self.ci)
        return d


def load_judge_template(name_or_path: str | os.PathLike | Template) -> Template:
    """A judge template by name ("relative", "principles") or file path.

    Returns:
      The parsed template; it must use {instruction}, {response_a} and {response_b}.
    """
    if isinstance(name_or_path, Template):
        template = name_or_path
    else:
        path = os.fspath(name_or_path)
        if not os.path.isfile(path):
            path = os.path.join(JUDGE_TEMPLATE_DIR,
                                path if path.endswith(".txt") else path + ".txt")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no judge template {name_or_path!r}: not a file and "
                                        f"not in {JUDGE_TEMPLATE_DIR}")
        with open(path, encoding="utf-8") as f:
            template = parse_template(f.read(), name=os.path.basename(path)[:-4], path=path)
    return template.require({"instruction", "response_a", "response_b"})


def parse_verdict(text: str) -> str | None:
    """"A", "B", or None when the judge's text names no verdict.

    The last "[RESULT] X" wins (a judge may quote the format first); a text that is only a
    letter ("B", "(A).", "Response B") or opens with one ("B. It follows ...", "A) ...")
    counts too.
    """
    if not isinstance(text, str):
        return None
    found = _RESULT.findall(text)
    if found:
        return found[-1].upper()
    m = _BARE.match(text.strip()) or _LEAD.match(text.strip())
    return m.group(1).upper() if m else None


def _words(text: str) -> int:
    return len(text.split())


def _prompts(template, prompts, first, second, *, references, rubric, principles):
    values = {"rubric": rubric, "principles": principles or ""}
    if "principles" in template.fields and not principles:
        raise ValueError(f"{template.path}: the template uses {{principles}}; pass principles=")
    out = []
    for i, p in enumerate(prompts):
        ref = references[i] if references is not None else "(none given)"
        out.append(template.render(instruction=p, response_a=first[i], response_b=second[i],
                                   reference=ref, **values))
    return out


def _stats(texts_ab: Sequence[str], texts_ba: Sequence[str], responses_a, responses_b, *,
           p_ab: np.ndarray | None = None, p_ba: np.ndarray | None = None) -> WinRateResult:
    """Statistics from the judge's texts for order A|B and order B|A.

    With `p_ab`/`p_ba` (a letter judge's P(slot A) per judgement) the scores are those
    probabilities instead of parsed verdicts, and a verdict is the likelier slot.
    """
    n = len(texts_ab)
    if p_ab is None:
        v_ab = [parse_verdict(t) for t in texts_ab]
        v_ba = [parse_verdict(t) for t in texts_ba]
        # Scores for system A: in order B|A, slot "B" holds system A.
        s_ab = np.array([{"A": 1.0, "B": 0.0}.get(v, 0.5) for v in v_ab])
        s_ba = np.array([{"A": 0.0, "B": 1.0}.get(v, 0.5) for v in v_ba])
    else:
        s_ab, s_ba = np.asarray(p_ab, float), 1.0 - np.asarray(p_ba, float)
        slot = lambda p: "A" if p > 0.5 else "B" if p < 0.5 else None  # noqa: E731
        v_ab, v_ba = [slot(p) for p in p_ab], [slot(p) for p in p_ba]
    pair = (s_ab + s_ba) / 2
    nan = float("nan")
    win = float(pair.mean()) if n else nan
    se = float(pair.std(ddof=1) / math.sqrt(n)) if n > 1 else nan
    ci = (max(0.0, win - 1.96 * se), min(1.0, win + 1.96 * se)) if n > 1 else (nan, nan)
    both = [(a, b) for a, b in zip(v_ab, v_ba) if a is not None and b is not None]
    bias = float(np.mean([a == b for a, b in both])) if both else nan

    diff = np.array([_words(a) - _words(b) for a, b in zip(responses_a, responses_b)], float)
    longer = diff > 0
    strata = [pair[longer], pair[~longer]]
    stratified = (float(np.mean([s.mean() for s in strata]))
                  if all(len(s) for s in strata) else nan)
    y = np.concatenate([s_ab, s_ba])
    rms = math.sqrt(float(np.mean(diff ** 2))) if n else 0.0
    if n and rms > 0:
        z = np.tanh(np.concatenate([diff, diff]) / rms)
        design = np.stack([np.ones_like(z), z], axis=1)
        intercept = float(np.linalg.lstsq(design, y, rcond=None)[0][0])
        lc = min(1.0, max(0.0, intercept))
    else:
        lc = win  # no length difference to control for
    judgements = tuple(
        {"scores": (float(s_ab[i]), float(s_ba[i])), "verdicts": (v_ab[i], v_ba[i]),
         "raw": (texts_ab[i], texts_ba[i])} for i in range(n))
    return WinRateResult(
        win_rate=win, stderr=se, ci=ci, n_pairs=n, position_bias=bias,
        position_bias_pairs=len(both),
        parse_failures=sum(v is None for v in v_ab) + sum(v is None for v in v_ba),
        n_judgements=2 * n, lc_win_rate=lc, lc_stratified=stratified,
        a_longer_share=float(longer.mean()) if n else nan, judgements=judgements)


def _check(prompts, responses, references):
    n = len(prompts)
    for name, r in responses.items():
        if len(r) != n:
            raise ValueError(f"responses {name!r}: {len(r)} responses for {n} prompts")
    if references is not None and len(references) != n:
        raise ValueError(f"references: {len(references)} for {n} prompts")


def pairwise_win_rate(prompts: Sequence[str], responses_a: Sequence[str],
                      responses_b: Sequence[str], *, judge: Teacher,
                      template: str | os.PathLike | Template = "relative",
                      references: Sequence[str] | None = None, seed: int = 0,
                      rubric: str = DEFAULT_RUBRIC, principles: str | None = None,
                      max_tokens: int = 512, temperature: float = 0.0,
                      use_chat: bool = True) -> WinRateResult:
    """Win rate of responses A over responses B to the same prompts, judged in both orders.

    Args:
      prompts: the questions.
      responses_a, responses_b: each system's answer per prompt.
      judge: any Teacher (see `align_jax.sdg.backends.make_teacher`).
      template: judge template name ("relative", "principles") or path or Template.
      references: reference answers for the {reference} placeholder.
      seed: the judge's sampling seed (all requests of one call share it).
      rubric: the {rubric} of the relative template.
      principles: the {principles} of the principles template, one per line.
      max_tokens, temperature, use_chat: how the judge is asked (greedy chat by default).
    Returns:
      A WinRateResult.
    """
    return win_rate_matrix(prompts, {"A": responses_a, "B": responses_b}, judge=judge,
                           template=template, references=references, seed=seed,
                           rubric=rubric, principles=principles, max_tokens=max_tokens,
                           temperature=temperature, use_chat=use_chat)["results"][("A", "B")]


def win_rate_matrix(prompts: Sequence[str], responses: Mapping[str, Sequence[str]], *,
                    judge: Teacher, template: str | os.PathLike | Template = "relative",
                    references: Sequence[str] | None = None, seed: int = 0,
                    rubric: str = DEFAULT_RUBRIC, principles: str | None = None,
                    max_tokens: int = 512, temperature: float = 0.0,
                    use_chat: bool = True) -> dict:
    """Pairwise win rates between several systems, as the papers' pairwise tables.

    All judgements (every pair of systems, both orders) go to the judge in one batch.

    Args:
      prompts: the questions.
      responses: system name -> its answer per prompt (in insertion order).
      judge, template, references, seed, rubric, principles, max_tokens, temperature,
        use_chat: as `pairwise_win_rate`.
    Returns:
      {"names": [...], "win_rate", "ci_low", "ci_high", "lc_win_rate": (S, S) arrays where
      [i, j] is system i over system j (0.5 on the diagonal), "results": {(a, b): WinRateResult}
      for each pair a before b}.
    """
    prompts = list(prompts)
    responses = {k: list(v) for k, v in responses.items()}
    _check(prompts, responses, references)
    template = load_judge_template(template)
    names = list(responses)
    pairs = list(itertools.combinations(names, 2))
    batch = []
    kw = dict(references=references, rubric=rubric, principles=principles)
    for a, b in pairs:
        batch += _prompts(template, prompts, responses[a], responses[b], **kw)
        batch += _prompts(template, prompts, responses[b], responses[a], **kw)
    probs = None
    if hasattr(judge, "letter_probabilities"):  # eval.letter_judge.LetterJudge
        probs = np.asarray(judge.letter_probabilities(batch, use_chat=use_chat), float)
        texts = [f"P(A)={p:.4f}" for p in probs]
    else:
        texts = ask(judge, batch, use_chat=use_chat, temperature=temperature,
                    max_tokens=max_tokens, seed=seed)
    n, s = len(prompts), len(names)
    out = {"names": names, "results": {}}
    mats = {k: np.full((s, s), 0.5) for k in ("win_rate", "ci_low", "ci_high", "lc_win_rate")}
    for k, (a, b) in enumerate(pairs):
        lo, hi = 2 * n * k, 2 * n * (k + 1)
        chunk = texts[lo:hi]
        soft = {} if probs is None else {"p_ab": probs[lo:lo + n], "p_ba": probs[lo + n:hi]}
        res = _stats(chunk[:n], chunk[n:], responses[a], responses[b], **soft)
        out["results"][(a, b)] = res
        i, j = names.index(a), names.index(b)
        mats["win_rate"][i, j], mats["win_rate"][j, i] = res.win_rate, 1 - res.win_rate
        mats["ci_low"][i, j], mats["ci_high"][j, i] = res.ci[0], 1 - res.ci[0]
        mats["ci_high"][i, j], mats["ci_low"][j, i] = res.ci[1], 1 - res.ci[1]
        mats["lc_win_rate"][i, j], mats["lc_win_rate"][j, i] = res.lc_win_rate, 1 - res.lc_win_rate
    out.update(mats)
    return out
