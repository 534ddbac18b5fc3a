"""report.md's sections with intervals: the headline table, differences against the base
system, preference accuracy against shortcut rules, yes/no answers and their per-question
table. Each function returns markdown lines from the report dict (`evaluate_models`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from align_jax.eval.bootstrap import CONFIDENCE, RESAMPLES, SEED
from align_jax.eval.intervals import HEADLINE

_OTHER = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeLsum": "ROUGE-Lsum",
          "bertscore_precision": "BERTScore P", "bertscore_recall": "BERTScore R"}


def _num(x, digits: int = 3, sign: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _digits(key: str) -> int:
    return 2 if key == "bleu" else 3


def _ci(cell: Mapping | None, key: str = "", *, diff: bool = False) -> str:
    """"x [lo, hi]" for an interval dict (its difference with `diff`); "-" when missing."""
    if not cell:
        return "-"
    d = _digits(key)
    if diff:
        if "diff" not in cell:
            return "-"
        text = (f"{_num(cell['diff'], d, True)} [{_num(cell['diff_ci_low'], d, True)}, "
                f"{_num(cell['diff_ci_high'], d, True)}]")
        return f"**{text}**" if cell.get("diff_resolved") else text
    if not np.isfinite(cell.get("estimate", np.nan)):
        return "n/a"  # computed over no item
    return f"{_num(cell['estimate'], d)} [{_num(cell['ci_low'], d)}, {_num(cell['ci_high'], d)}]"


def method_line() -> str:
    return (f"[lo, hi]: {CONFIDENCE:.0%} percentile bootstrap interval over the items "
            f"(questions, or pairs for preference accuracy), {RESAMPLES:,} resamples, seed "
            f"{SEED}; every system is resampled with the same item indices, so differences "
            f"are paired.")


def headline_lines(report: Mapping, *, base: str | None) -> list[str]:
    """The headline table (every metric with its interval) and the differences against base."""
    table = report.get("intervals", {})
    keys = [k for k in HEADLINE if any(k in row for row in table.values())]
    if not table or not keys:
        return []
    lines = ["| system | " + " | ".join(HEADLINE[k] for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(_ci(row.get(k), k) for k in keys) + " |"
              for s, row in table.items()]
    lines += ["", method_line()]
    if base is not None and base in table:
        others = [s for s in table if s != base]
        if others:
            n = {k: next((row[k]["n"] for row in table.values() if k in row), 0) for k in keys}
            lines += ["", f"## Differences against {base}", "",
                      f"System minus {base}, with the {CONFIDENCE:.0%} interval of the paired "
                      f"difference. **Bold**: the interval excludes 0. Otherwise the two cannot "
                      f"be told apart on these items ("
                      + ", ".join(f"{HEADLINE[k]}: {n[k]}" for k in keys) + ").", "",
                      "| system | " + " | ".join(HEADLINE[k] for k in keys) + " |",
                      "|---" * (len(keys) + 1) + "|"]
            lines += [f"| {s} | " + " | ".join(_ci(table[s].get(k), k, diff=True)
                                               for k in keys) + " |" for s in others]
    return lines


def other_metric_lines(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The remaining reference metrics (point estimates; report.csv has them too)."""
    keys = [k for k in _OTHER if any(k in m for m in metrics.values())]
    if not keys:
        return []
    lines = ["", "Other reference metrics (point estimates):", "",
             "| system | " + " | ".join(_OTHER[k] for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(_num(m.get(k)) for k in keys) + " |"
              for s, m in metrics.items()]
    return lines


def _diff(c: Mapping | None) -> str:
    if not c:
        return "-"
    return f"{_num(c['estimate'], 3, True)} [{_num(c['ci_low'], 3, True)}, " \
           f"{_num(c['ci_high'], 3, True)}]"


def preference_lines(ev: Mapping) -> list[str]:
    """Preference accuracy of every system next to the shortcut rules, and who beats whom."""
    n, best, base = ev["pairs"], ev["best_shortcut"], ev.get("base")
    rows = ev["rows"]
    lines = ["", f"## Preference accuracy against shortcut rules ({n} held-out pairs)", "",
             "A row scores 1 on a pair when it prefers the chosen answer, 0 when it prefers the "
             "rejected one and 1/2 when it cannot decide: a model by log p(chosen) - log "
             "p(rejected) (0 is a tie); a rule when both or neither answer starts with its "
             "word, or both have the same length in characters. A rule never reads the "
             "question, so an accuracy it reaches is no evidence of alignment.", "",
             "| row | kind | accuracy [95% interval] |", "|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['kind']} | {_ci(r)} |")
    lines += ["", f"Best shortcut: {best} ({_num(rows[best]['estimate'])}).", "",
              f"| system | minus best shortcut [95%] | beats {best}? | "
              f"minus {base or 'base'} [95%] | beats {base or 'base'}? |",
              "|---|---|---|---|---|"]
    for name, c in ev["comparisons"].items():
        vb = c.get("vs_base")
        lines.append(f"| {name} | {_diff(c['vs_best_shortcut'])} | "
                     f"{c['vs_best_shortcut']['verdict']} | {_diff(vb)} | "
                     f"{vb['verdict'] if vb else '-'} |")
    return lines


def _answer_cell(a: Mapping) -> str:
    text = " ".join(str(a["text"]).split()).replace("|", "\\|") or "*(empty)*"
    if len(text) > 160:
        text = text[:157] + "..."
    mark = "right" if a["right"] else "wrong"
    return f"**{a['polarity'] or 'unclear'}** ({mark}): {text}"


def yes_no_lines(yn: Mapping, *, aligned: str | None) -> list[str]:
    """The yes/no section: settings, the constant-answer check, accuracy table, minimal pairs,
    and the per-question table of the base and the aligned system."""
    n, yes, share = yn["questions"], yn["yes"], yn["yes_share"]
    rows, base = yn["rows"], yn.get("base")
    best = yn["best_constant"]
    best_acc = rows[best]["accuracy"]["estimate"]
    balanced = yes == n - yes
    lines = ["", f"## Yes/no answers ({n} questions: {yes} expect yes, {n - yes} expect no)", "",
             f"Every system answers each question greedily, at most {yn['max_new_tokens']} new "
             f"tokens, prompted with the question followed by: \"{yn['instruction']}\"" if
             yn.get("instruction") else
             f"Every system answers each question greedily, at most {yn['max_new_tokens']} new "
             f"tokens, prompted with the question alone.",
             "",
             "The answer's polarity is read from its opening: \"Yes\" or \"No\" as the first "
             "word (any case; after whitespace, markdown emphasis, quotes or an \"Answer:\" "
             "label). Any other opening (\"Nobody\", \"I'm sorry\", \"Yes and no\") is unclear "
             "and counts as wrong.", "",
             f"A constant answer scores the share of its polarity: always \"yes\" "
             f"{_num(rows['always yes']['accuracy']['estimate'])}, always \"no\" "
             f"{_num(rows['always no']['accuracy']['estimate'])} (yes share of this set "
             f"{_num(share)}). "
             + ("The set is balanced, so no constant answer can exceed 0.5."
                if balanced else
                f"The set is not balanced: the better constant answer ({best}) reaches "
                f"{_num(best_acc)}, the bar every system must clear."), "",
             "| row | kind | accuracy | on yes-questions | on no-questions | unclear | "
             f"minus {best} [95%] | beats {best}? | minus {base or 'base'} [95%] | "
             f"beats {base or 'base'}? |",
             "|---" * 10 + "|"]
    for name, r in rows.items():
        vc, vb = r.get("vs_best_constant"), r.get("vs_base")
        lines.append(f"| {name} | {r['kind']} | {_ci(r['accuracy'])} | "
                     f"{_ci(r['accuracy_yes'])} | {_ci(r['accuracy_no'])} | "
                     f"{_ci(r['unclear'])} | {_diff(vc)} | {vc['verdict'] if vc else '-'} | "
                     f"{_diff(vb)} | {vb['verdict'] if vb else '-'} |")
    if yn["minimal_pairs"]:
        lines += ["", f"Minimal pairs ({yn['minimal_pairs']} group(s) of questions sharing a "
                      f"`pair_id`: one fact changed so the answer flips): share of groups with "
                      f"every answer right. A constant answer scores 0 on every group whose "
                      f"answers differ.", "", "| row | all answers of the group right |",
                  "|---|---|"]
        lines += [f"| {name} | {_ci(r['pairs_both_right'])} |" for name, r in rows.items()]
    present = yn["per_question"][0]["answers"] if yn["per_question"] else {}
    shown = [s for s in dict.fromkeys((base, aligned)) if s is not None and s in present]
    if shown:
        lines += ["", f"## Yes/no answers per question ({' vs '.join(shown)})", "",
                  "| question | expected | " + " | ".join(shown) + " |",
                  "|---" * (len(shown) + 2) + "|"]
        for q in yn["per_question"]:
            question = " ".join(q["question"].split()).replace("|", "\\|")
            lines.append(f"| {question} | {q['expected']} | "
                         + " | ".join(_answer_cell(q["answers"][s]) for s in shown) + " |")
    return lines


__all__ = ["headline_lines", "method_line", "other_metric_lines", "preference_lines",
           "yes_no_lines"]
