"""Evaluate several checkpoints on the same held-out records; write the report.

report.md (the papers' table of systems x metrics with bootstrap intervals and the
differences against the base system, preference accuracy against shortcut rules, yes/no
answer correctness against constant answers, the judged win-rate matrix, side-by-side
answers), report.csv (the table, intervals as columns, shortcut and constant rows),
report.json, report.png (training curves, NLL, preference and yes/no accuracy with error
bars), metrics.png (reference metrics and yes/no accuracy per system, with error bars) and
winrate.png (the heatmap).
"""

import csv
import io
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np

from align_jax import distributed
from align_jax.atomic import atomic_write, atomic_write_json
from align_jax.eval import evidence_report
from align_jax.eval.answers import (
    ORACLE_SUFFIX,
    RAG_SUFFIX,
    bertscore_setting,
    evaluate_generation,
    load_bertscore_model,
    metric_table,
)
from align_jax.eval.evidence import (
    margin_choices,
    preference_evidence,
    yes_no_evidence,
    yes_no_prompt,
)
from align_jax.eval.intervals import HEADLINE, csv_columns, interval_table, replicates
from align_jax.eval.judge import (
    JudgeError,
    opponent_summary,
    opponent_table,
    probe_judge,
    win_rate_matrix,
)
from align_jax.eval.letter_judge import LetterJudge
from align_jax.eval.oracle_rag import csv_rows as oracle_csv_rows
from align_jax.eval.oracle_rag import (
    oracle_lines,
    oracle_section,
    retrieval_agreement,
    unknown_chunk_ids,
    with_grounding,
)
from align_jax.eval.plots import plot_metrics, plot_overview, plot_win_rates
from align_jax.eval.retrieval import oracle_records, with_retrieval
from align_jax.eval.scoring import ScoreSet, margin_summary
from align_jax.models.hf import load_hf
from align_jax.sdg.backends import make_teacher

# What a base chat model is asked after each yes/no question, so that it opens with the word.
YES_NO_INSTRUCTION = "Answer yes or no first, then explain briefly."


def _say(msg: str) -> None:
    if distributed.is_main():
        print(f"[eval] {msg}", flush=True)


def plot(out_dir: str, report: Mapping, stages: Mapping[str, str]) -> str:
    """report.png: training loss per stage and held-out metrics per model."""
    return plot_overview(out_dir, report, stages)


def _make_judge(judge, *, mesh=None, rules="fsdp"):
    if isinstance(judge, str) and judge.startswith("letters:"):
        return LetterJudge(judge.partition(":")[2], mesh=mesh, rules=rules)
    if isinstance(judge, str):
        return make_teacher(judge)
    return judge


def _judge_label(judge) -> str:
    return judge if isinstance(judge, str) else type(judge).__name__


def check_judge(judge, *, template="relative", judge_kwargs: Mapping | None = None,
                mesh=None, rules: str = "fsdp", consequence: str = "nothing was generated"):
    """Makes the judge from its spec and asks it one request (`probe_judge`).

    Args:
      judge: a judge spec ("openai:<URL>", "local:<dir>", "letters:<dir>") or a judge object.
      template, judge_kwargs: as `evaluate_models`.
      mesh, rules: where a local judge is placed.
      consequence: what the error adds (what the failure spared).
    Returns:
      The judge object (made from a spec, or `judge` itself).
    Raises:
      JudgeError: one line naming the judge and why it did not answer.
    """
    judge_obj = _make_judge(judge, mesh=mesh, rules=rules)
    try:
        probe_judge(judge_obj, template=template, **(judge_kwargs or {}))
    except JudgeError as e:
        raise JudgeError(f"judge {_judge_label(judge)}: {e}; {consequence}") from e.__cause__
    _say(f"judge {_judge_label(judge)} answered a one-request probe")
    return judge_obj


def evaluate_models(out_dir: str, *, models: Mapping[str, str], tokenizer, sft_test: Sequence,
                    pref_test: Sequence, retriever=None, rag_models: Sequence[str] = (),
                    reference: tuple[str, str] | None = None, seq_len: int = 256,
                    num_samples: int = 3, max_new_tokens: int = 40,
                    stages: Mapping[str, str] | None = None, num_questions: int | None = None,
                    bertscore_model="all-minilm-l6-v2", bertscore_layer: int | None = None,
                    bertscore_baseline=None, judge=None,
                    judge_template: str = "relative", judge_kwargs: Mapping | None = None,
                    judge_systems: Sequence[str] | None = None, mesh=None,
                    rules: str = "fsdp", teacher_forced: bool = True,
                    yes_no_test: Sequence[Mapping] | None = None,
                    yes_no_instruction: str | None = YES_NO_INSTRUCTION,
                    yes_no_max_new_tokens: int = 24, base_model: str | None = None,
                    oracle=None) -> dict:
    """Scores each model (name -> HF dir) on the held-out records and writes the report.

    Args:
      out_dir: where the report files go.
      models: display name -> Hugging Face checkpoint dir.
      tokenizer: the tokenizer all models share, or model name -> that model's own
        tokenizer: each model is scored and generates with its own (models that share one
        tokenizer object share its formatted records); the teacher-forced scores are over
        the records every tokenizer fits in `seq_len`, so that they stay paired.
      sft_test, pref_test: held-out SFT and preference records.
      retriever: an `align_jax.eval.retrieval` retriever (semantic, BM25, TF-IDF) for RAG.
      rag_models: models also run with one retrieved chunk in the prompt ("<name> + RAG").
      reference: (policy, reference) names: also report DPO's implicit-reward accuracy.
      seq_len: scoring length.
      num_samples: answers shown side by side in report.md.
      max_new_tokens: answer budget (greedy).
      stages: run sub-folder -> model name, for the loss curves.
      num_questions: held-out questions answered by every system (default all).
      bertscore_model: encoder for BERTScore (dir, named model or loaded); None skips it.
      bertscore_layer: its layer (0 = the embeddings; None: the last). The value-alignment
        paper's setting is roberta-large at layer 17 (`eval.bertscore.PAPER_SETTING`).
      bertscore_baseline: a bert-score baseline file (or (P, R, F)) to rescale the scores
        with; None: raw scores. report.md and report.json name the model, layer and this.
      judge: a Teacher, a LetterJudge, or a "local:..."/"openai:..."/"letters:..." spec
        for the pairwise win rates (letters: see `align_jax.eval.letter_judge`); None skips.
      judge_template, judge_kwargs: see `align_jax.eval.judge.win_rate_matrix`.
      judge_systems: the systems the judge compares (default all; a small judge on a CPU
        may only afford a few).
      mesh, rules: a jax Mesh: the models are loaded onto it and scoring (the shared scorer)
        and generation are sharded over it, with the `rules` preset, as in training.
      teacher_forced: also score the held-out records teacher-forced (answer NLL with and
        without RAG, preference accuracy, DPO's implicit reward). They share the generation's
        prompt passes but cost a forward over every scored answer token: on a CPU they add
        ~11-15% to the generation of 1,000 questions x 8 systems (benchmarks/RESULTS.md);
        False leaves the papers' evaluation (generated answers, reference metrics, judge)
        at the generation plus ~4%.
      yes_no_test: yes/no questions (`question`, `answer` "yes"/"no", optional `pair_id`):
        every system (RAG ones with the question's retrieved chunk) answers each greedily;
        the polarity read from the answer's opening is scored against the expected answer,
        next to the constant answers (`align_jax.eval.evidence`).
      yes_no_instruction: appended to each yes/no question (None: the question alone).
      yes_no_max_new_tokens: budget of those answers (at most max_new_tokens).
      base_model: the model every system is compared with (paired bootstrap intervals of
        the differences); default "base" when it is a model, else the first model.
      oracle: an `align_jax.eval.retrieval.OracleRetriever`: the RAG models also answer the
        questions whose grounding chunk it knows (`chunk_id`, else `evidence` or `rule`
        text) with that chunk in the prompt ("<name> + oracle RAG"), scored on exactly
        those questions beside their semantic "+ RAG" rows (`eval.oracle_rag`); and
        report["retrieval"]: how often the retriever's first chunk is the grounding one.
    Returns:
      The report dict.
    """
    report = {"models": {}, "samples": {}}
    pref_test = list(pref_test)
    questions = list(sft_test)[:num_questions] if num_questions else list(sft_test)
    yes_no = [dict(r) for r in yes_no_test or ()]
    base = base_model or ("base" if "base" in models else next(iter(models), None))
    if base is not None and base not in models:
        raise ValueError(f"base_model {base!r} is not among the models {list(models)}")
    report["base_system"] = base
    report["base_reason"] = ("given as base_model" if base_model else "the base model"
                             if base == "base" else "the first model: no model named 'base' "
                             "in this run")
    # Retrieval once for all RAG models (the held-out records, then the yes/no questions);
    # the questions are the first records of sft_test.
    rag_yes_no = None
    if retriever is not None and any(n in rag_models for n in models):
        found = with_retrieval(list(sft_test) + [{"prompt": r["question"]} for r in yes_no],
                               retriever)
        rag_test, rag_yes_no = found[:len(sft_test)], found[len(sft_test):]
    else:
        rag_test = None
    rag_questions = rag_test[:len(questions)] if rag_test is not None else None
    # The oracle rows: the answered questions whose grounding chunk is known.
    oracle_test, oracle_index = ([], [])
    if oracle is not None and rag_questions is not None:
        oracle_test, oracle_index = oracle_records(with_grounding(questions), oracle)
    # The held-out completions, formatted once; every model scores them from the prompt
    # passes of its own answers (a prompt that is not a question is run once for all of its
    # completions): `answer_and_score`.
    # Formatted once per tokenizer; the sets of the first model's tokenizer stand for all of
    # them wherever only the kept records matter (they keep the same records).
    tokenizers = _tokenizers(models, tokenizer)
    group_sets = _group_score_sets(tokenizers, sft_test=sft_test, pref_test=pref_test,
                                   rag_test=rag_test, oracle_test=oracle_test,
                                   seq_len=seq_len, teacher_forced=teacher_forced)
    first = next(iter(group_sets.values()), {})
    sets = {k: first[k] for k in ("answer_nll", "preference") if k in first}
    rag_set, oracle_set = first.get("answer_nll_rag"), first.get("answer_nll_oracle")
    report["tokenizers"] = {n: _tokenizer_name(t) for n, t in tokenizers.items()}
    # The judge is checked with one request before anything is generated.
    systems_all = [s for n in models for s in (n, n + RAG_SUFFIX)
                   if s == n or (rag_questions is not None and n in rag_models)]
    if judge_systems is not None and set(judge_systems) - set(systems_all):
        raise ValueError(f"judge_systems {sorted(set(judge_systems) - set(systems_all))} are "
                         f"not among the systems {systems_all}")
    judging = bool(judge is not None and questions and len(
        systems_all if judge_systems is None else set(judge_systems)) > 1)
    judge_obj = None
    if judging:
        judge_obj = check_judge(judge, template=judge_template, judge_kwargs=judge_kwargs,
                                mesh=mesh, rules=rules)
    loaded, score_sets = {}, {}
    for name, path in models.items():
        # Laid out on the mesh once, by the preset: scoring and generation both use it.
        loaded[name] = load_hf(path, mesh=mesh, rules=rules)
        own = group_sets.get(id(tokenizers[name]), {})
        score_sets[name] = {k: own[k] for k in ("answer_nll", "preference") if k in own}
        if "answer_nll_rag" in own and name in rag_models:
            score_sets[name]["answer_nll_rag"] = own["answer_nll_rag"]
            if "answer_nll_oracle" in own:
                score_sets[name]["answer_nll_oracle"] = own["answer_nll_oracle"]
    t0 = time.perf_counter()
    systems = len(loaded) + sum(n in rag_models for n in loaded) * (rag_questions is not None)
    scored = (f" and score {len(sets['answer_nll'].examples)} reference answers"
              f"{' (and with RAG)' if rag_set is not None else ''} and "
              f"{len(sets['preference'].examples)} preference pairs" if sets else "")
    asked = (f" and {len(yes_no)} yes/no questions (at most "
             f"{min(yes_no_max_new_tokens, max_new_tokens)} new tokens)" if yes_no else "")
    if oracle_test:
        asked += (f"; the RAG models also answer the {len(oracle_test)} questions whose "
                  f"grounding chunk is known, with that chunk in the prompt (oracle RAG)")
    bert_model = load_bertscore_model(bertscore_model) if questions else None
    # Checked (the layer's range) before anything is generated.
    bert = bertscore_setting(bertscore_model, bert_model, layer=bertscore_layer,
                             baseline=bertscore_baseline)
    _say(f"generating: {systems} systems answer {len(questions)} questions (greedy, at most "
         f"{max_new_tokens} new tokens){asked}{scored}; then BLEU, ROUGE, BERTScore")
    gen = evaluate_generation(
        loaded, tokenizers, questions, rag_records=rag_questions, rag_models=rag_models,
        max_new_tokens=max_new_tokens, bertscore_model=bert_model,
        bertscore_layer=bertscore_layer, bertscore_baseline=bertscore_baseline,
        mesh=mesh, rules=rules, score_sets=score_sets, say=_say,
        yes_no_prompts=[yes_no_prompt(r["question"], yes_no_instruction) for r in yes_no],
        yes_no_rag_prompts=(None if rag_yes_no is None else
                            [yes_no_prompt(r["prompt"], yes_no_instruction)
                             for r in rag_yes_no]),
        yes_no_max_new_tokens=yes_no_max_new_tokens, oracle_records=oracle_test)
    if bert is not None:
        gen["settings"]["bertscore"] = bert
    margins = {}
    for name, got in gen["scores"].items():
        if not sets:
            report["models"][name] = {}
            continue
        own = score_sets[name]
        margins[name] = own["preference"].summary(got["preference"])
        row = {"answer_nll": own["answer_nll"].summary(got["answer_nll"]),
               "preference": margin_summary(*margins[name])}
        if "answer_nll_rag" in got:
            row["answer_nll_rag"] = own["answer_nll_rag"].summary(got["answer_nll_rag"])
        report["models"][name] = row
    implicit = None
    if reference is not None and all(n in margins for n in reference):
        # DPO's implicit reward from the margins already scored: log-ratio differences.
        (policy, skipped), (ref, _) = margins[reference[0]], margins[reference[1]]
        report["implicit_reward"] = margin_summary(policy - ref, skipped)
        implicit = (f"implicit reward ({reference[0]} vs {reference[1]})", policy - ref)
    if yes_no:
        report["yes_no"] = {
            "instruction": yes_no_instruction,
            "max_new_tokens": gen["settings"]["yes_no_max_new_tokens"],
            **yes_no_evidence(yes_no, gen["yes_no_answers"], base=base)}
    if sets and len(sets["preference"].examples):
        pairs = [pref_test[i] for i in sets["preference"].kept]
        rows = {n: margin_choices(m) for n, (m, _) in margins.items()}
        if implicit is not None:
            rows[implicit[0]] = margin_choices(implicit[1])
        report["preference_evidence"] = preference_evidence(pairs, rows, base=base)
    report["intervals"] = interval_table(
        replicates(gen, sets, rag_set=rag_set, margins=margins, yes_no=report.get("yes_no"),
                   model_sets=score_sets), base=base)
    if oracle is not None and rag_questions is not None and questions:
        report["oracle_rag"] = oracle_section(gen, index=oracle_index, total=len(questions),
                                              scores=gen["scores"], rag_set=rag_set,
                                              oracle_set=oracle_set, model_sets=score_sets)
        report["oracle_rag"]["unknown_chunk_ids"] = unknown_chunk_ids(questions, oracle)
        report["retrieval"] = retrieval_agreement(with_grounding(questions), retriever, oracle)
    if questions or yes_no:
        report["generation"] = {k: gen[k] for k in ("metrics", "settings", "seconds")}
        report["answers"] = gen["answers"]
        _say(f"generation, held-out scores and reference metrics: "
             f"{time.perf_counter() - t0:.0f} s")
        report["samples"] = {s: a[:num_samples] for s, a in gen["answers"].items()}
    if questions:
        judged = {s: a for s, a in gen["answers"].items()
                  if judge_systems is None or s in judge_systems}
        if judge_systems is not None and len(judged) != len(set(judge_systems)):
            raise ValueError(f"judge_systems {sorted(set(judge_systems) - set(judged))} are not "
                             f"among the systems {list(gen['answers'])}")
        if judge_obj is not None and len(judged) > 1:
            t0 = time.perf_counter()
            pairs = len(judged) * (len(judged) - 1) // 2
            # The answers are kept whatever the judge does next.
            kept = _write_answers(out_dir, gen)
            _say(f"judge {_judge_label(judge)}: {pairs} system pairs x {len(questions)} "
                 f"questions, both orders")
            try:
                m = win_rate_matrix(gen["prompts"], judged, judge=judge_obj,
                                    template=judge_template,
                                    **{"references": gen["references"], **(judge_kwargs or {})})
            except (RuntimeError, OSError) as e:  # TeacherError, connection, HTTP
                raise JudgeError(f"judge {_judge_label(judge)} failed while judging: "
                                 f"{' '.join(str(e).split())}; the generated answers are kept "
                                 f"in {kept}") from e
            finally:
                if isinstance(judge, str) and hasattr(judge_obj, "close"):
                    judge_obj.close()  # made here from its spec: its connections end here
            report["win_rates"] = {
                "judge": _judge_label(judge),
                "template": str(judge_template), "names": m["names"],
                **{k: np.asarray(m[k]).tolist()
                   for k in ("win_rate", "ci_low", "ci_high", "lc_win_rate")},
                "pairs": {f"{a} vs {b}": r.summary() for (a, b), r in m["results"].items()},
                # The value-alignment paper's column: mean +- SD of a system's win rates over
                # its opponents (population SD, ddof=0), raw and length-controlled.
                "opponents": _opponents(m), "opponents_sd_ddof": 0,
                "constraint": m.get("constraint")}
            _say(f"judge: {time.perf_counter() - t0:.0f} s")
    if not distributed.is_main():  # every process computed the report; process 0 writes it
        return report
    if "win_rates" in report:
        plot_win_rates(os.path.join(out_dir, "winrate.png"), m,
                       judge=report["win_rates"]["judge"])
    if "generation" in report:
        plot_metrics(os.path.join(out_dir, "metrics.png"), report["generation"]["metrics"],
                     intervals=report["intervals"], yes_no=report.get("yes_no"))
        _write_csv(os.path.join(out_dir, "report.csv"), report)
    _write_markdown(out_dir, report, [q["prompt"] for q in questions[:num_samples]], reference,
                    [q.get("completion", "") for q in questions[:num_samples]],
                    aligned=_aligned(models, reference))
    if stages:
        plot(out_dir, report, stages)
    return report


def _tokenizers(models: Mapping[str, str], tokenizer) -> dict:
    """model name -> its tokenizer (one given for all, or a mapping that names every model)."""
    if not isinstance(tokenizer, Mapping):
        return {n: tokenizer for n in models}
    missing = [n for n in models if n not in tokenizer]
    if missing:
        raise ValueError(f"tokenizer: no tokenizer for the models {missing}")
    return {n: tokenizer[n] for n in models}


def _tokenizer_name(tok) -> str:
    return str(getattr(tok, "path", None) or f"<in-memory {type(tok).__name__}>")


def _group_score_sets(tokenizers: Mapping, *, sft_test, pref_test, rag_test, oracle_test,
                      seq_len: int, teacher_forced: bool) -> dict:
    """id(tokenizer) -> {"answer_nll", "preference", and with their records "answer_nll_rag",
    "answer_nll_oracle"}: ScoreSets formatted with that tokenizer, each restricted to the
    records that every tokenizer keeps (so per-record scores of all models line up)."""
    if not teacher_forced:
        return {}
    toks = {id(t): t for t in tokenizers.values()}
    parts = {"answer_nll": (sft_test, "sft"), "preference": (pref_test, "preference")}
    if rag_test is not None:
        parts["answer_nll_rag"] = (rag_test, "sft")
        if oracle_test:
            parts["answer_nll_oracle"] = (oracle_test, "sft")
    out = {g: {} for g in toks}
    for key, (records, kind) in parts.items():
        made = {g: ScoreSet.make(records, kind=kind, tokenizer=t, seq_len=seq_len)
                for g, t in toks.items()}
        common = set.intersection(*(set(m.kept) for m in made.values()))
        for g, m in made.items():
            keep = [i for i, k in enumerate(m.kept) if k in common]
            out[g][key] = m if len(keep) == len(m.kept) else ScoreSet(
                kind=m.kind, examples=[m.examples[i] for i in keep],
                skipped=m.skipped + len(m.kept) - len(keep),
                kept=tuple(m.kept[i] for i in keep))
    return out


def _write_answers(out_dir: str, gen: Mapping) -> str:
    """answers.json: every system's generated answers with their questions and references
    (written before judging, so that a judge failure loses none of them)."""
    path = os.path.join(out_dir, "answers.json")
    if distributed.is_main():
        atomic_write_json(path, {k: gen[k] for k in ("prompts", "references", "answers",
                                                      "settings")}
                          | ({"yes_no_answers": gen["yes_no_answers"]}
                             if "yes_no_answers" in gen else {}))
    return path


def _opponents(m: Mapping) -> dict[str, dict[str, float]]:
    raw, lc = opponent_summary(m), opponent_summary(m, key="lc_win_rate")
    return {name: {"mean": raw[name][0], "sd": raw[name][1], "lc_mean": lc[name][0],
                   "lc_sd": lc[name][1]} for name in m["names"]}


def _aligned(models: Mapping[str, str], reference) -> str | None:
    """The aligned system of the per-question table: DPO's policy, else the last model."""
    if reference is not None and reference[0] in models:
        return reference[0]
    return next(reversed(list(models)), None)


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    return "-" if x is None else "n/a" if not np.isfinite(x) else f"{x:.{digits}f}"


def _write_csv(path, report):
    """One row per system (kind "system"): the metrics, then per headline metric its interval
    and its difference against the base system with that interval; then the shortcut rules
    (preference accuracy) and the constant answers (yes/no accuracy) as rows of their kinds."""
    header, rows = metric_table(report)
    keys = [k for k in HEADLINE if any(k in r for r in report["intervals"].values())]
    extra, cells = csv_columns(report["intervals"], keys)
    yn = report.get("yes_no") or {}
    yn_parts = [(f"yes_no_{k}{suffix}", k, f) for k in (
        ("accuracy_yes", "accuracy_no", "unclear") if yn else ())
        for suffix, f in (("", "estimate"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))]

    def yes_no_cells(name):
        r = yn.get("rows", {}).get(name, {})
        return {col: r.get(k, {}).get(f) for col, k, f in yn_parts}

    out = [{**dict(zip(header, r)), "kind": "system", **dict(zip(extra, cells[r[0]])),
            **yes_no_cells(r[0]), "base system": report.get("base_system")} for r in rows]
    for name, r in report.get("preference_evidence", {}).get("rows", {}).items():
        if r["kind"] == "shortcut":
            out.append({"system": name, "kind": "shortcut", "preference accuracy": r["estimate"],
                        "preference_accuracy_ci_low": r["ci_low"],
                        "preference_accuracy_ci_high": r["ci_high"]})
    for name, r in yn.get("rows", {}).items():
        if r["kind"] == "constant":
            a = r["accuracy"]
            out.append({"system": name, "kind": "constant answer",
                        "yes/no accuracy": a["estimate"], "yes_no_accuracy_ci_low": a["ci_low"],
                        "yes_no_accuracy_ci_high": a["ci_high"], **yes_no_cells(name)})
    out += oracle_csv_rows(report.get("oracle_rag"))
    columns = [header[0], "kind", *header[1:], *extra, *(c for c, _, _ in yn_parts),
               "base system"]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(columns)
    for row in out:
        w.writerow([x if x is None or isinstance(x, str)
                    else (float(x) if np.isfinite(x) else None)
                    for x in (row.get(c) for c in columns)])
    atomic_write(path, buf.getvalue())


def _win_rate_lines(wr) -> list[str]:
    names = wr["names"]
    lines = ["", f"## Pairwise win rates (judge: {wr['judge']}, template: {wr['template']})", "",
             "Win rate of the row system over the column system, both orders judged, ties "
             "count 1/2; [95% interval]. Length-controlled and position statistics per pair "
             "below. Picture: winrate.png." + _constraint_sentence(wr.get("constraint")), "",
             "| A \\ B | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    unparsed = {frozenset(p.split(" vs ", 1)): f"{r['parse_failures']}/{r['n_judgements']}"
                for p, r in wr["pairs"].items()}
    for i, a in enumerate(names):
        cells = ["-" if i == j else _win_cell(wr, i, j, unparsed.get(frozenset((a, b))))
                 for j, b in enumerate(names)]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    empty = [p for p, r in wr["pairs"].items() if not np.isfinite(r["win_rate"])]
    if empty:
        lines += ["", f"n/a: the judge gave no usable verdict for {len(empty)} of "
                      f"{len(wr['pairs'])} pair(s) of systems ({', '.join(empty)}): none of "
                      f"its texts held a verdict (unparsed verdicts below), so they have no "
                      f"win rate."]
    if "opponents" in wr:
        ddof = wr.get("opponents_sd_ddof", 0)
        lines += ["", "Win rate = mean +- SD over opponents, as the value-alignment paper's "
                      "tables give it: the mean of a system's row above (its win rates over "
                      "the other systems) and their "
                      + ("population SD (ddof=0)" if ddof == 0 else f"SD with ddof={ddof}")
                      + f" over its {len(names) - 1} opponent(s); the same for the "
                        "length-controlled (regression) win rates.", "",
                  opponent_table(wr, ddof=ddof)]
    lines += ["", "| pair | win rate A | LC (regression) | LC (stratified) | A longer | "
                  "position bias | unparsed verdicts |", "|---|---|---|---|---|---|---|"]
    for pair, r in wr["pairs"].items():
        lines.append(f"| {pair} | {_fmt(r['win_rate'])} | {_fmt(r['lc_win_rate'])} | "
                     f"{_fmt(r['lc_stratified'])} | {_fmt(r['a_longer_share'])} | "
                     f"{_fmt(r['position_bias'])} | {r['parse_failures']}/{r['n_judgements']} |")
    return lines


def _win_cell(wr, i: int, j: int, unparsed: str | None) -> str:
    w = wr["win_rate"][i][j]
    if w is None or not np.isfinite(w):
        return f"n/a ({unparsed} unparsed)" if unparsed else "n/a"
    lo, hi = wr["ci_low"][i][j], wr["ci_high"][i][j]
    return f"{w:.2f} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]"


def _constraint_sentence(c: Mapping | None) -> str:
    if not c or c.get("pattern") is None:
        return ""
    if not c["applied"]:
        return (f" The judge was asked to answer under the regex `{c['pattern']}` but did not "
                f"apply it (a server that refuses structured output): its free texts were read "
                f"tolerantly.")
    cut = (f"; {c['incomplete']} ran out of tokens first" if c.get("incomplete") else "")
    return f" Verdicts were written under the regex `{c['pattern']}`{cut}."


def _write_markdown(out_dir, report, prompts, reference, refs, *, aligned=None):
    lines = ["# Value alignment report", ""] + _tokenizer_lines(report.get("tokenizers"))
    gen = report.get("generation")
    base = report.get("base_system")
    if gen:
        s = gen["settings"]
        header, _ = metric_table(report)
        lines += [f"Every system answers the same {s['questions']} held-out questions "
                  f"({s['decoding']} decoding, at most {s['max_new_tokens']} new tokens); "
                  f"answers are scored against the reference answers. BLEU is corpus "
                  f"SacreBLEU (0-100); ROUGE and BERTScore are mean F-measures (0-1)."
                  + _bertscore_sentence(s.get("bertscore"))
                  + (" Answer NLL is per answer token (lower is better; RAG rows with the "
                     "passage in the prompt); preference accuracy is the model's."
                     if "answer NLL" in header else "")
                  + (" Yes/no accuracy: see its section below." if "yes_no" in report else "")
                  + (f" Differences are against {base} ({report['base_reason']})."
                     if base else ""), ""]
        lines += evidence_report.headline_lines(report, base=base)
        lines += evidence_report.other_metric_lines(gen["metrics"])
        lines += ["", "Pictures: metrics.png (reference metrics"
                      + (", yes/no accuracy" if "yes_no" in report else "")
                      + ", 95% intervals as error bars), report.png (training curves"
                      + (", NLL, preference accuracy)." if "answer NLL" in header else ").")]
    if "preference_evidence" in report:
        lines += evidence_report.preference_lines(report["preference_evidence"])
    if "yes_no" in report:
        lines += evidence_report.yes_no_lines(report["yes_no"], aligned=aligned)
    lines += oracle_lines(report.get("oracle_rag"), report.get("retrieval"))
    if "win_rates" in report:
        lines += _win_rate_lines(report["win_rates"])
    if not any(report["models"].values()):
        lines += ["", "Teacher-forced scores (answer NLL, preference accuracy) were not "
                      "computed (teacher_forced=False)."]
    else:
        lines += _teacher_forced_lines(report, reference)
    for i, p in enumerate(prompts):
        lines += ["", f"## Sample {i + 1}: {p}", "", "| system | answer |", "|---|---|",
                  f"| *reference* | {_cell(refs[i])} |"]
        for name, texts in report["samples"].items():
            lines.append(f"| {name} | {_cell(texts[i])} |")
    atomic_write(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")


def _tokenizer_lines(tokenizers: Mapping[str, str] | None) -> list[str]:
    if not tokenizers:
        return []
    distinct = len(set(tokenizers.values()))
    if distinct == 1:
        return [f"Tokenizer: every model is scored and generates with "
                f"{next(iter(tokenizers.values()))}.", ""]
    return ["Tokenizers: each model is scored and generates with its own ("
            + "; ".join(f"{n}: {t}" for n, t in tokenizers.items()) + ")."
            + f" {distinct} different tokenizers: answer NLL is per token of each model's "
              f"own tokenizer, so it compares across them only roughly; the scores are over "
              f"the records every tokenizer fits.", ""]


def _bertscore_sentence(b: Mapping | None) -> str:
    if not b:
        return ""
    layer = f"layer {b['layer']}" + (" (the last layer)" if b["last_layer"] else "")
    scale = (f"rescaled with the baseline {b['baseline']}" if b["rescaled"]
             else "not rescaled with a baseline")
    return (f" BERTScore: {b['model']}, {layer}, {scale} (scores of other models or layers, "
            f"e.g. the value-alignment paper's roberta-large at layer 17, do not compare).")


def _teacher_forced_lines(report, reference) -> list[str]:
    lines = ["", "## Teacher-forced scores per model", "",
              "Held-out records (never trained on). NLL is per answer token; preference "
              "accuracy is how often log p(chosen) > log p(rejected) (a tie counts 1/2).", "",
              "| model | answer NLL | answer NLL + RAG | preference accuracy | mean margin |",
              "|---|---|---|---|---|"]
    for name, row in report["models"].items():
        rag = row.get("answer_nll_rag", {}).get("nll_per_token")
        lines.append(f"| {name} | {_fmt(row['answer_nll']['nll_per_token'])} | "
                     f"{_fmt(rag)} | {_fmt(row['preference']['accuracy'], 2)} | "
                     f"{_fmt(row['preference']['mean_margin'], 2)} |")
    if "implicit_reward" in report:
        ir = report["implicit_reward"]
        lines += ["", f"DPO implicit reward ({reference[0]} vs {reference[1]}) ranks the chosen "
                      f"answer first for {_fmt(ir['accuracy'], 2)} of held-out pairs "
                      f"(mean margin {_fmt(ir['mean_margin'], 2)} nats)."]
    first = next(iter(report["models"].values()), None)
    if first is not None:
        lines += ["", f"{first['answer_nll']['examples']} held-out SFT records, "
                      f"{first['preference']['examples']} held-out preference pairs."]
    return lines


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "*(empty)*"


__all__ = ["ORACLE_SUFFIX", "RAG_SUFFIX", "evaluate_models", "plot"]
