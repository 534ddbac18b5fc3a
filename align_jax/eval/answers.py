"""Generated answers of every system and their reference metrics (BLEU, ROUGE, BERTScore).

A system is a model with or without the RAG passage in the prompt. All of one model's
prompts (its plain and its RAG questions) go through `align_jax.generate` in one call, so
the device sees one batched generation per model; decoding is greedy unless told otherwise
and the settings are recorded with the answers.

BLEU and ROUGE are host work (Python): a model's answers are scored in a background thread
while the device generates the next model's answers, and the last model's while BERTScore
runs, so they add little to the generation's time (see benchmarks/bench_eval.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np

from align_jax.eval.bertscore import bertscore
from align_jax.eval.metrics import bleu_from_statistics, bleu_statistics, rouge_scores
from align_jax.eval.retrieval import resolve_embedder
from align_jax.eval.scoring import ScoreSet
from align_jax.generate import generate, score_continuations
from align_jax.models.encoder import load_encoder
from align_jax.tokenizer import encode_prompt, load_tokenizer

log = logging.getLogger(__name__)

RAG_SUFFIX = " + RAG"
# The system of a RAG model answering with each question's own grounding chunk (the oracle).
ORACLE_SUFFIX = " + oracle RAG"
# The prompt-set name of a system's yes/no questions inside one `answer_and_score` call.
_YES_NO = " [yes/no]"


def chat_prompt_ids(tokenizer, prompt: str, *, max_prompt_tokens: int) -> list[int]:
    """The prompt as a single user turn through the chat template, left-truncated."""
    return encode_prompt(tokenizer, prompt)[-max_prompt_tokens:]


def generate_answers(config, params, tokenizer, prompt_sets: Mapping[str, Sequence[str]], *,
                     max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                     batch_size: int | None = None, mesh=None, rules: str = "fsdp"
                     ) -> dict[str, list[str]]:
    """One model's answers to several prompt sets, in one batched generation.

    Args:
      config, params: the model.
      tokenizer: its tokenizer (chat template).
      prompt_sets: system name -> its prompts (e.g. plain and with the RAG passage).
      max_new_tokens, temperature, seed: decoding (greedy by default).
      batch_size, mesh, rules: passed to `generate`.
    Returns:
      system name -> answers, in prompt order.
    """
    return answer_and_score(config, params, tokenizer, prompt_sets, {},
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            batch_size=batch_size, mesh=mesh, rules=rules)[0]


def answer_and_score(config, params, tokenizer, prompt_sets: Mapping[str, Sequence[str]],
                     score_sets: Mapping[str, ScoreSet], *, max_new_tokens: int,
                     temperature: float = 0.0, seed: int = 0, batch_size: int | None = None,
                     mesh=None, rules: str = "fsdp",
                     budgets: Mapping[str, int] | None = None
                     ) -> tuple[dict[str, list[str]], dict[str, list[tuple[float, ...]]]]:
    """One model's answers to several prompt sets and its scores of held-out completions.

    Every prompt is run once: a scored example whose prompt ids are those of a generated
    prompt (a held-out question and its reference answer, a preference pair on the same
    question) is scored from that generation's own prefill; the others go through
    `score_continuations`, one prompt pass for all of a prompt's completions. A completion
    that several examples give for the same prompt is scored once.

    Args:
      config, params, tokenizer, prompt_sets: as in `generate_answers`.
      score_sets: name -> `ScoreSet` (formatted held-out records) to score.
      max_new_tokens, temperature, seed, batch_size, mesh, rules: as in `generate_answers`.
      budgets: prompt set name -> its own smaller answer budget (yes/no questions need only
        the opening): those sets are generated in one more `generate` call, compiled for
        `max_new_tokens` (`shape_budget`) so that its shapes can repeat the first call's;
        their prompts are prefilled apart from the scored completions.
    Returns:
      (system name -> answers in prompt order, set name -> log p(completion | prompt) of each
      example's completions, in example order; `ScoreSet.summary` reads them).
    """
    budgets = dict(budgets or {})
    for n, b in budgets.items():
        if n not in prompt_sets or not 1 <= int(b) <= max_new_tokens:
            raise ValueError(f"budgets[{n!r}] = {b}: expected a prompt set's budget in "
                             f"1..max_new_tokens={max_new_tokens}")
    names = [n for n in prompt_sets if n not in budgets]
    flat = [p for n in names for p in prompt_sets[n]]
    budget = int(config.max_position) - max_new_tokens
    if (flat or budgets) and budget < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"model's {config.max_position} positions")
    ids = [chat_prompt_ids(tokenizer, p, max_prompt_tokens=budget) for p in flat]
    # Where each scored example's completions go: a generated row, or a score-only prompt.
    rows = {}
    for i, p in enumerate(ids):
        rows.setdefault(tuple(p), i)
    gen_conts = [{} for _ in ids]  # continuation -> its position among the row's
    only_prompts, only_conts, only_rows = [], [], {}
    placed = {}  # (set, example) -> (True if generated, prompt index, continuation positions)
    for set_name, score_set in score_sets.items():
        for j, ex in enumerate(score_set.examples):
            key = tuple(int(t) for t in ex.prompt)
            if key in rows:
                conts, where = gen_conts[rows[key]], (True, rows[key])
            else:
                if key not in only_rows:
                    only_rows[key] = len(only_prompts)
                    only_prompts.append(list(key))
                    only_conts.append({})
                conts, where = only_conts[only_rows[key]], (False, only_rows[key])
            # An answer that two sets share for one prompt (a reference that is also the
            # chosen answer) is scored once.
            placed[set_name, j] = (*where, [conts.setdefault(tuple(int(t) for t in c),
                                                             len(conts))
                                            for c in ex.completions])
    gen_conts = [[list(c) for c in row] for row in gen_conts]
    only_conts = [[list(c) for c in row] for row in only_conts]
    score_gen = any(gen_conts)
    texts, gen_scores = [], []
    if flat:
        out = generate(config, params, ids, max_new_tokens=max_new_tokens,
                       temperature=temperature, seed=seed, tokenizer=tokenizer,
                       batch_size=batch_size, mesh=mesh, rules=rules,
                       continuations=gen_conts if score_gen else None)
        texts, gen_scores = list(out.texts), out.continuation_logps or []
    only_scores = (score_continuations(config, params, only_prompts, only_conts,
                                       batch_size=batch_size, mesh=mesh, rules=rules)
                   if only_prompts else [])
    answers, start = {}, 0
    for n in names:
        answers[n] = [t.strip() for t in texts[start:start + len(prompt_sets[n])]]
        start += len(prompt_sets[n])
    for b in sorted(set(budgets.values())):
        short = [n for n in budgets if budgets[n] == b]
        prompts = [chat_prompt_ids(tokenizer, p, max_prompt_tokens=budget)
                   for n in short for p in prompt_sets[n]]
        out = (generate(config, params, prompts, max_new_tokens=int(b),
                        shape_budget=max_new_tokens, temperature=temperature, seed=seed,
                        tokenizer=tokenizer, batch_size=batch_size, mesh=mesh, rules=rules)
               if prompts else None)
        start = 0
        for n in short:
            answers[n] = [t.strip() for t in out.texts[start:start + len(prompt_sets[n])]] \
                if out is not None else []
            start += len(prompt_sets[n])
    answers = {n: answers[n] for n in prompt_sets}
    scores = {}
    for set_name, score_set in score_sets.items():
        got = []
        for j in range(len(score_set.examples)):
            generated, index, positions = placed[set_name, j]
            row = (gen_scores if generated else only_scores)[index]
            got.append(tuple(row[k] for k in positions))
        scores[set_name] = got
    return answers, scores


def load_bertscore_model(model):
    """(EncoderConfig, params, tokenizer) for BERTScore, or None when it is not installed.

    Args:
      model: an encoder dir, a named model ("all-minilm-l6-v2"), a loaded tuple, or None.
    """
    if model is None or isinstance(model, tuple):
        return model
    try:
        path = resolve_embedder(model)
    except FileNotFoundError as e:
        log.warning("BERTScore skipped: %s", e)
        return None
    config, params = load_encoder(path)
    return config, params, load_tokenizer(path)


def _text_parts(answers: Mapping[str, Sequence[str]], references: Sequence[str]
                ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """(system -> BLEU and mean ROUGE, system -> per-question parts for the bootstrap)."""
    metrics, items = {}, {}
    for name, hyps in answers.items():
        stats = bleu_statistics(hyps, references)
        per = rouge_scores(hyps, references)
        metrics[name] = {"bleu": bleu_from_statistics(stats.sum(0)) if len(stats) else 0.0,
                         **{k: float(v.mean()) if len(v) else 0.0 for k, v in per.items()}}
        items[name] = {"bleu_stats": stats, "rougeL": per["rougeL"]}
    return metrics, items


def _text_metrics(answers: Mapping[str, Sequence[str]], references: Sequence[str]
                  ) -> dict[str, dict[str, float]]:
    return _text_parts(answers, references)[0]


def _bertscore_parts(answers: Mapping[str, Sequence[str]],
                     references: Sequence[str] | Mapping[str, Sequence[str]], *,
                     model, layer: int | None, baseline=None
                     ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """(system -> mean BERTScore P/R/F1, system -> per-question F1).

    `references`: one list for every system, or system -> its own list (the oracle systems
    answer a subset of the questions); `baseline`: a bert-score baseline file or (P, R, F)
    to rescale with (None: raw scores)."""
    if model is None or not answers:
        return {}, {}
    refs = {name: list(references[name] if isinstance(references, Mapping) else references)
            for name in answers}
    # One call for all systems: each reference is encoded once and the batches are full.
    # (Without idf the pairs are independent, so this equals one call per system.)
    bs = bertscore([h for hyps in answers.values() for h in hyps],
                   [r for name in answers for r in refs[name]], model=model, layer=layer,
                   rescale_with_baseline=baseline is not None, baseline=baseline)["per_pair"]
    out, f1, start = {}, {}, 0
    for name in answers:
        n = len(refs[name])
        part = {m: bs[m][start:start + n] for m in ("precision", "recall", "f1")}
        start += n
        out[name] = {f"bertscore_{m}": float(v.mean()) if n else float("nan")
                     for m, v in part.items()}
        f1[name] = np.asarray(part["f1"], np.float64)
    return out, f1


def bertscore_setting(model, loaded, *, layer: int | None, baseline=None) -> dict | None:
    """How BERTScore was computed, for the report: {"model": its name, "layer": the layer
    used, "last_layer": whether that is the encoder's last (`layer` None), "rescaled":
    whether scores are rescaled with a baseline, "baseline": the baseline given}, or None
    when BERTScore was skipped.

    Args:
      model: what `load_bertscore_model` was given (a dir, a named model or a loaded tuple).
      loaded: its result.
      layer, baseline: as `evaluate_generation`'s bertscore_layer / bertscore_baseline.
    """
    if loaded is None:
        return None
    last = int(loaded[0].num_layers)
    used = last if layer is None else int(layer)
    if not 0 <= used <= last:
        raise ValueError(f"bertscore_layer {layer} is out of range 0..{last} (the encoder's "
                         f"layers)")
    return {"model": os.fspath(model) if isinstance(model, (str, os.PathLike))
            else "<in-memory encoder>", "layer": used, "last_layer": used == last,
            "rescaled": baseline is not None,
            "baseline": None if baseline is None else
            (os.fspath(baseline) if isinstance(baseline, (str, os.PathLike))
             else [float(x) for x in baseline])}


def score_answers(answers: Mapping[str, Sequence[str]], references: Sequence[str], *,
                  bertscore_model=None, bertscore_layer: int | None = None
                  ) -> dict[str, dict[str, float]]:
    """BLEU, ROUGE and (with a model) BERTScore of each system's answers.

    Args:
      answers: system name -> answers, aligned with `references`.
      references: the held-out reference answers.
      bertscore_model: a loaded (config, params, tokenizer), or None to skip BERTScore.
      bertscore_layer: the encoder layer (default the last).
    Returns:
      system -> {"bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", and with a model
      "bertscore_precision", "bertscore_recall", "bertscore_f1"}.
    """
    out = _text_metrics(answers, references)
    for name, m in _bertscore_parts(answers, references, model=bertscore_model,
                                    layer=bertscore_layer)[0].items():
        out[name].update(m)
    return out


def evaluate_generation(models: Mapping[str, tuple], tokenizer, records: Sequence[Mapping], *,
                        rag_records: Sequence[Mapping] | None = None,
                        rag_models: Sequence[str] = (), max_new_tokens: int = 64,
                        bertscore_model=None, bertscore_layer: int | None = None,
                        bertscore_baseline=None, mesh=None, rules: str = "fsdp",
                        score_sets: Mapping[str, Mapping[str, ScoreSet]] | None = None,
                        say=None, yes_no_prompts: Sequence[str] = (),
                        yes_no_rag_prompts: Sequence[str] | None = None,
                        yes_no_max_new_tokens: int | None = None,
                        oracle_records: Sequence[Mapping] = ()) -> dict:
    """Generates every system's answers to the held-out questions and scores them.

    Args:
      models: model name -> (config, params).
      tokenizer: the tokenizer they share, or model name -> its own tokenizer.
      records: held-out SFT records (`prompt`, `completion` = the reference answer).
      rag_records: the same records with the retrieved passage in the prompt.
      rag_models: models also run as "<name> + RAG".
      max_new_tokens: answer budget (greedy decoding).
      bertscore_model: loaded BERTScore encoder or None.
      bertscore_layer: its layer (None: the last).
      bertscore_baseline: a bert-score baseline file or (P, R, F) to rescale the scores
        with; None leaves them raw.
      mesh, rules: sharding of generation.
      score_sets: model name -> {set name: ScoreSet}: held-out completions each model also
        scores (teacher-forced), from the same prompt passes as its answers
        (`answer_and_score`).
      say: called with a progress line after each model.
      yes_no_prompts: yes/no questions (instruction included) every system also answers,
        in the same `answer_and_score` call as its other prompts.
      yes_no_rag_prompts: the same with the retrieved passage, for the RAG systems.
      yes_no_max_new_tokens: their answer budget (default max_new_tokens; at most that).
      oracle_records: held-out records with their own grounding chunk in the prompt
        (`retrieval.oracle_records`, a subset of `records`): the RAG models also answer
        them, as "<name> + oracle RAG", in the same `answer_and_score` call.
    Returns:
      {"answers": system -> answers, "metrics": system -> metrics (as `score_answers`),
       "items": system -> per-question parts ("bleu_stats" [N, 10], "rougeL" [N], with
       BERTScore "bertscore_f1" [N]), "yes_no_answers": system -> answers to the yes/no
       prompts (when given), "oracle": {"answers", "metrics", "items", "references"} of the
       oracle systems on their subset (when oracle_records are given), "scores": model ->
       set name -> log-probs (as `answer_and_score`), "prompts", "references", "settings":
       decoding settings, "seconds": {"generation", "metrics": what scoring added after the
       generation}}.
    """
    prompts = [r["prompt"] for r in records]
    refs = [r["completion"] for r in records]
    oracle_refs = [r["completion"] for r in oracle_records]
    yes_no_budget = min(int(yes_no_max_new_tokens or max_new_tokens), max_new_tokens)
    answers, yes_no, oracle, scores, text, t0 = {}, {}, {}, {}, [], time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eval-metrics") as host:
        for name, (config, params) in models.items():
            t = time.perf_counter()
            sets = {name: prompts}
            rag = rag_records is not None and name in rag_models
            if rag:
                sets[name + RAG_SUFFIX] = [r["prompt"] for r in rag_records]
            systems = list(sets)
            if name in rag_models and oracle_records:
                sets[name + ORACLE_SUFFIX] = [r["prompt"] for r in oracle_records]
            budgets = {}
            if yes_no_prompts:
                for system in systems:
                    if system != name and yes_no_rag_prompts is None:
                        continue
                    key = system + _YES_NO
                    sets[key] = list(yes_no_prompts if system == name else yes_no_rag_prompts)
                    budgets[key] = yes_no_budget
            own = tokenizer[name] if isinstance(tokenizer, Mapping) else tokenizer
            got, scores[name] = answer_and_score(
                config, params, own, sets, (score_sets or {}).get(name, {}),
                max_new_tokens=max_new_tokens, mesh=mesh, rules=rules, budgets=budgets)
            mine = {s: got[s] for s in systems}
            answers.update(mine)
            yes_no.update({s: got[s + _YES_NO] for s in systems if s + _YES_NO in got})
            if refs:  # BLEU and ROUGE of these systems while the next model generates
                text.append(host.submit(_text_parts, mine, refs))
            if name + ORACLE_SUFFIX in got:
                oracle[name + ORACLE_SUFFIX] = got[name + ORACLE_SUFFIX]
                text.append(host.submit(_text_parts, {name + ORACLE_SUFFIX: oracle[
                    name + ORACLE_SUFFIX]}, oracle_refs))
            if say is not None:
                scored = ", ".join(f"{len(v)} {k}" for k, v in scores[name].items())
                asked = f" + {len(yes_no_prompts)} yes/no answers" if yes_no_prompts else ""
                extra = (f" + {len(oracle_records)} with the oracle passage"
                         if name + ORACLE_SUFFIX in got else "")
                say(f"{name}: {len(systems)} system(s) x {len(prompts)} answers{extra}{asked}"
                    f"{f', scored {scored}' if scored else ''} "
                    f"({time.perf_counter() - t:.0f} s)")
        t1 = time.perf_counter()
        # One BERTScore call for every system, the oracle ones against their subset.
        every = {**answers, **oracle}
        bert, f1 = _bertscore_parts(
            every, {s: oracle_refs if s in oracle else refs for s in every},
            model=bertscore_model, layer=bertscore_layer,
            baseline=bertscore_baseline) if refs else ({}, {})
        metrics, items = {}, {}
        for future in text:
            m, i = future.result()
            metrics.update(m)
            items.update(i)
    for name, m in bert.items():
        metrics[name].update(m)
        items[name]["bertscore_f1"] = f1[name]
    t2 = time.perf_counter()
    out = {"answers": answers, "metrics": {s: metrics[s] for s in answers if s in metrics},
           "items": {s: items[s] for s in answers if s in items}, "scores": scores,
           "prompts": prompts, "references": refs,
           "settings": {"decoding": "greedy", "max_new_tokens": max_new_tokens,
                        "questions": len(prompts)},
           "seconds": {"generation": t1 - t0, "metrics": t2 - t1}}
    if oracle:
        out["oracle"] = {"answers": oracle, "metrics": {s: metrics[s] for s in oracle},
                         "items": {s: items[s] for s in oracle}, "references": oracle_refs}
    if yes_no_prompts:
        out["yes_no_answers"] = yes_no
        out["settings"]["yes_no_max_new_tokens"] = yes_no_budget
    return out


def _scored(summary: Mapping | None, key: str):
    """A teacher-forced score; "n/a" when it was computed over nothing (no record fit), nan
    when it was not computed at all."""
    if not summary:
        return np.nan
    x = summary.get(key, np.nan)
    return x if np.isfinite(x) else "n/a"


def metric_table(report: Mapping) -> tuple[list[str], list[list]]:
    """(header, rows) of the papers' table: one row per system, reference metrics, NLL and
    preference accuracy (of the system's model; NLL with the passage for RAG systems; both
    columns left out when no model was scored teacher-forced), and yes/no accuracy when the
    report has a yes/no section."""
    header = ["system", "BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "BERTScore P",
              "BERTScore R", "BERTScore F1", "answer NLL", "preference accuracy"]
    rows = []
    gen = report.get("generation", {})
    metrics = gen.get("metrics", {})
    yes_no = report.get("yes_no", {}).get("rows", {})
    for system in list(report.get("answers", {})) or list(metrics):
        m = metrics.get(system, {})
        model = system[:-len(RAG_SUFFIX)] if system.endswith(RAG_SUFFIX) else system
        mrow = report["models"].get(model, {})
        nll = (mrow.get("answer_nll_rag") if system.endswith(RAG_SUFFIX)
               else mrow.get("answer_nll")) or {}
        rows.append([system] + [m.get(k, np.nan) for k in (
            "bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_precision",
            "bertscore_recall", "bertscore_f1")] +
            [_scored(nll, "nll_per_token"), _scored(mrow.get("preference"), "accuracy")] +
            ([yes_no.get(system, {}).get("accuracy", {}).get("estimate", np.nan)]
             if yes_no else []))
    if not any(report.get("models", {}).values()):
        keep = [i for i, h in enumerate(header) if h not in ("answer NLL", "preference accuracy")]
        header, rows = ([header[i] for i in keep],
                        [[r[i] for i in keep] + r[len(header):] for r in rows])
    if yes_no:
        header = header + ["yes/no accuracy"]
    return header, rows
