"""Bootstrap intervals of the report's headline metrics and of every difference against base.

Each metric is recomputed on resampled items from per-item parts (`align_jax.eval.bootstrap`):

| metric | items | statistic of a resample |
|---|---|---|
| BLEU | questions | corpus SacreBLEU of the summed per-sentence n-gram statistics |
| ROUGE-L, BERTScore F1 | questions | mean of per-question F-measures |
| answer NLL | held-out SFT records | summed answer NLL / summed answer tokens |
| preference accuracy | held-out pairs | mean of per-pair scores (1, 0, or 1/2 for a tie) |
| yes/no accuracy | yes/no questions | mean of per-question correctness |

All systems are resampled with the same item indices, so a difference against the base
system is a paired bootstrap.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from align_jax.eval.answers import RAG_SUFFIX
from align_jax.eval.bootstrap import Bootstrap, Replicates
from align_jax.eval.evidence import margin_choices
from align_jax.eval.metrics import bleu_from_statistics

# key -> column title, in table order.
HEADLINE = {"bleu": "BLEU", "rougeL": "ROUGE-L", "bertscore_f1": "BERTScore F1",
            "answer_nll": "answer NLL", "preference_accuracy": "preference accuracy",
            "yes_no_accuracy": "yes/no accuracy"}


def text_replicates(items: Mapping[str, np.ndarray], boot: Bootstrap
                    ) -> dict[str, Replicates]:
    """BLEU, ROUGE-L and (when present) BERTScore F1 of one system's answers.

    Args:
      items: {"bleu_stats": [N, 10] (`metrics.bleu_statistics`), "rougeL": [N],
        optionally "bertscore_f1": [N]}.
      boot: the resamples of the N questions.
    """
    out = {"bleu": boot.statistic(items["bleu_stats"], bleu_from_statistics),
           "rougeL": boot.mean(items["rougeL"])}
    if "bertscore_f1" in items:
        out["bertscore_f1"] = boot.mean(items["bertscore_f1"])
    return out


def nll_replicates(nll_N, tokens_N) -> Replicates:
    """Answer NLL per token from each record's summed NLL and its answer token count."""
    return Bootstrap(len(nll_N)).ratio(nll_N, tokens_N)


def replicates(gen: Mapping, sets: Mapping, *, rag_set=None, margins: Mapping,
               yes_no: Mapping | None, model_sets: Mapping | None = None
               ) -> dict[str, dict[str, Replicates]]:
    """Every headline metric of every system, on resampled items.

    Args:
      gen: `evaluate_generation`'s result ("answers", "items", "scores", "prompts").
      sets: the held-out `ScoreSet`s ("answer_nll", "preference"); empty when the models
        were not scored teacher-forced.
      rag_set: the RAG records' ScoreSet (NLL of the "+ RAG" systems), or None.
      margins: model -> (preference margins, skipped), as `ScoreSet.summary` gives them.
      yes_no: the report's yes/no section (`evidence.yes_no_evidence`), or None.
      model_sets: model -> its own {"answer_nll", "answer_nll_rag"} ScoreSets (formatted
        with its own tokenizer), in place of `sets` / `rag_set` for that model.
    Returns:
      system -> metric key (`HEADLINE`) -> Replicates, systems in table order. A RAG
      system's preference accuracy is its model's.
    """
    reps = {s: {} for s in gen["answers"]}
    for system, items in gen.get("items", {}).items():
        reps[system].update(text_replicates(items, Bootstrap(len(gen["prompts"]))))
    for name, got in gen["scores"].items():
        if not sets:
            continue
        own = (model_sets or {}).get(name, {})
        reps[name]["answer_nll"] = nll_replicates(*own.get(
            "answer_nll", sets["answer_nll"]).per_example(got["answer_nll"]))
        if "answer_nll_rag" in got and name + RAG_SUFFIX in reps:
            reps[name + RAG_SUFFIX]["answer_nll"] = nll_replicates(
                *own.get("answer_nll_rag", rag_set).per_example(got["answer_nll_rag"]))
        choices = margin_choices(margins[name][0])
        for system in (name, name + RAG_SUFFIX):
            if system in reps:
                reps[system]["preference_accuracy"] = Bootstrap(len(choices)).mean(choices)
    if yes_no is not None:
        boot = Bootstrap(yes_no["questions"])
        for system in reps:
            if system in yes_no["rows"]:
                right = [q["answers"][system]["right"] for q in yes_no["per_question"]]
                reps[system]["yes_no_accuracy"] = boot.mean(np.asarray(right, np.float64))
    return reps


def interval_table(reps: Mapping[str, Mapping[str, Replicates]], *, base: str | None
                   ) -> dict[str, dict[str, dict]]:
    """Intervals of every system's metrics and of their differences against `base`.

    Args:
      reps: system -> metric key -> Replicates (systems in table order).
      base: the system differences are taken against (None: none are).
    Returns:
      system -> metric -> {"estimate", "ci_low", "ci_high", "n", and against the base
      "diff", "diff_ci_low", "diff_ci_high", "diff_resolved" (the interval excludes 0)};
      a difference is left out for the base itself and where the items differ in number.
    """
    out = {}
    for system, metrics in reps.items():
        row = {}
        for key, r in metrics.items():
            cell = r.interval().as_dict()
            other = reps.get(base, {}).get(key) if base is not None else None
            if other is not None and system != base and other.n == r.n:
                d = (r - other).interval()
                cell.update(diff=d.estimate, diff_ci_low=d.low, diff_ci_high=d.high,
                            diff_resolved=d.excludes_zero())
            row[key] = cell
        out[system] = row
    return out


def csv_columns(table: Mapping[str, Mapping[str, dict]], keys) -> tuple[list[str], dict]:
    """Extra report.csv columns: per metric `<key>_ci_low`, `<key>_ci_high`,
    `<key>_diff_vs_base`, `<key>_diff_ci_low`, `<key>_diff_ci_high`.

    Returns:
      (column names, system -> [values in column order], NaN where missing).
    """
    names = [f"{k}_{s}" for k in keys
             for s in ("ci_low", "ci_high", "diff_vs_base", "diff_ci_low", "diff_ci_high")]
    fields = ("ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high")
    rows = {system: [row.get(k, {}).get(f, np.nan) for k in keys for f in fields]
            for system, row in table.items()}
    return names, rows


__all__ = ["HEADLINE", "csv_columns", "interval_table", "nll_replicates", "replicates",
           "text_replicates"]
