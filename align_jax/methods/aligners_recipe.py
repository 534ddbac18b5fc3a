"""The aligners recipe (`align-jax run --gin_file=configs/runs/aligners*.gin`).

    [aligner SDG with a teacher | given aligner/inspector files] -> one inspector per criterion
    -> one aligner per criterion -> the squad over (input, response) rows
    -> [each aligner on every row] -> [a judge: aligned vs original] -> report.md

Stages and what marks them done (a rerun skips a stage whose output exists):
  data/aligner.jsonl, data/inspector.jsonl     the training records (SDG or copies; with a
                                               `rewrite_encoder`, triples whose y and y' embed
                                               within `max_rewrite_cosine` are dropped first)
  inspectors/<criterion>/metrics.json          encoder classifier + held-out metrics
  aligner_base/aligner_markers.json            the base decoder with the markers added
  aligners/<criterion>/hf/config.json          the trained aligner
  responses.jsonl                              the rows to align (given, or sampled)
  squad.jsonl                                  the squad's output
  ablation.jsonl                               each aligner applied to every row (`ablation`)
  judge.json                                   win rates of every setting over the original
                                               responses (`judge`; redone when the judge,
                                               template or rubric changes)
  report.md, report.json                       the report (methods/aligners_eval.py)
"""

import collections
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from align_jax import interrupts, sharding
from align_jax.atomic import atomic_write
from align_jax.data.sources import load_records
from align_jax.eval.letter_judge import LetterJudge
from align_jax.generate import generate
from align_jax.generate.prompt_batches import DEFAULT_BATCH_SIZE, next_pow2
from align_jax.jsonl import read_jsonl, write_jsonl
from align_jax.losses.aligner import add_marker_tokens
from align_jax.methods import aligners_eval
from align_jax.methods import inspectors as insp
from align_jax.methods.aligners import align, squad
from align_jax.models import get_config, init_params, load_hf, save_hf
from align_jax.models.named import resolve_model_path
from align_jax.sdg.aligner_data import filter_rewrites
from align_jax.sdg.backends import make_teacher
from align_jax.sdg.pipeline import run_aligner_sdg
from align_jax.tokenizer import copy_tokenizer_files, encode_prompt, load_tokenizer
from align_jax.tokenizer_training import train_tokenizer
from align_jax.train.entry import train_main
from align_jax.train.optim import OptimizerConfig

CRITERIA = ("ethical", "factuality", "helpful")


def _say(msg: str) -> None:
    print(f"[aligners] {msg}", flush=True)


def _read_jsonl(path: str, schema: str | None = None) -> list[dict]:
    if schema is not None:
        return [r.data for r in load_records(path, schema=schema)[0]]
    return read_jsonl(path)


def _data(out: str, *, aligner_data, inspector_data, teacher, sdg_kwargs,
          rewrite_encoder=None, max_rewrite_cosine=0.9) -> tuple[list, list]:
    a_file, i_file = (os.path.join(out, "data", f) for f in ("aligner.jsonl", "inspector.jsonl"))
    if not (os.path.exists(a_file) and os.path.exists(i_file)):
        if aligner_data is None:
            if teacher is None:
                raise ValueError("aligners: give aligner_data (a JSONL of aligner triples) or "
                                 "a teacher to generate it")
            sdg_dir = os.path.join(out, "sdg")
            _say(f"stage sdg: aligner triples from {teacher} -> {sdg_dir}")
            with interrupts.phase("sdg"):
                run_aligner_sdg(sdg_dir, teacher=make_teacher(teacher),
                                **dict(sdg_kwargs or {}))
            aligner_data = os.path.join(sdg_dir, "aligner", "train.jsonl")
            inspector_data = inspector_data or os.path.join(sdg_dir, "inspector", "train.jsonl")
        triples = _read_jsonl(aligner_data, "aligner")
        if rewrite_encoder is not None:
            triples, dropped = filter_rewrites(triples, rewrite_encoder,
                                               max_cosine=max_rewrite_cosine)
            write_jsonl(os.path.join(out, "data", "aligner_dropped.jsonl"), dropped)
            _say(f"stage data: dropped {len(dropped)} triples whose y and y' have cosine >= "
                 f"{max_rewrite_cosine} ({rewrite_encoder}); kept {len(triples)}")
        if inspector_data is not None:
            records = _read_jsonl(inspector_data, "inspector")
        else:  # the paper's inspector data: (x, y) -> 0 and (x, y') -> 1 from the same triples
            records = [{"input": t["input"], "response": t[k],
                        "label": int(k != "initial_response"), "criterion": t["criterion"]}
                       for t in triples for k in ("initial_response", "aligned_response")]
        write_jsonl(a_file, triples)
        write_jsonl(i_file, records)
    return _read_jsonl(a_file), _read_jsonl(i_file)


def _aligner_base(out: str, *, aligner_base: str, texts: Sequence[str], seed: int) -> str:
    dst = os.path.join(out, "aligner_base")
    if os.path.exists(os.path.join(dst, "aligner_markers.json")):
        return dst
    src = aligner_base
    if not aligner_base.startswith("tiny"):
        src = resolve_model_path(aligner_base)
    else:
        src = _tiny_decoder(os.path.join(out, "tiny_decoder"), texts, preset=aligner_base,
                            seed=seed)
    _say(f"stage aligner_base: {aligner_base} with the markers added -> {dst}")
    return add_marker_tokens(src, dst, seed=seed)


def _tiny_decoder(path: str, texts: Sequence[str], *, preset: str, seed: int) -> str:
    """A random `preset` decoder and a sentencepiece tokenizer trained on `texts` (tiny runs)."""
    tok_dir = os.path.join(path, "tokenizer")
    tok = train_tokenizer(list(texts), tok_dir, vocab_size=512)
    config = dataclasses.replace(get_config(preset), vocab_size=tok.vocab_size,
                                 bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                 pad_token_id=tok.pad_id)
    save_hf(config, init_params(config, jax.random.PRNGKey(seed), optimize=False), path)
    copy_tokenizer_files(tok_dir, path)
    return path


def _responses(out: str, *, responses, prompts, generate_from, max_new_tokens, mesh) -> list:
    path = os.path.join(out, "responses.jsonl")
    if not os.path.exists(path):
        if responses is not None:
            rows = _read_jsonl(responses)
            for i, r in enumerate(rows, 1):
                if not isinstance(r.get("input"), str) or not isinstance(r.get("response"), str):
                    raise ValueError(f"{responses}:{i}: needs string fields 'input' and "
                                     f"'response'")
        elif prompts is not None and generate_from is not None:
            rows = _sample(prompts, generate_from, max_new_tokens=max_new_tokens, mesh=mesh)
        else:
            raise ValueError("aligners: give responses (JSONL of input/response) or prompts "
                             "and generate_from (a model to sample the responses from)")
        write_jsonl(path, [{"input": r["input"], "response": r["response"]} for r in rows])
    return _read_jsonl(path)


def _sample(prompts: str, model_dir: str, *, max_new_tokens: int, mesh) -> list[dict]:
    rows = _read_jsonl(prompts)
    questions = [r.get("input", r.get("prompt")) for r in rows]
    for i, q in enumerate(questions, 1):
        if not isinstance(q, str):
            raise ValueError(f"{prompts}:{i}: needs a string field 'input' or 'prompt'")
    _say(f"stage responses: sampling {len(questions)} answers from {model_dir}")
    config, params = load_hf(model_dir)
    tok = load_tokenizer(model_dir)
    ids = [encode_prompt(tok, q, chat_template=bool(getattr(tok, "chat_template", None)))
           for q in questions]
    gen = generate(config, params, ids, max_new_tokens=max_new_tokens, tokenizer=tok,
                   mesh=sharding.make_mesh(mesh) if mesh is not None else None)
    return [{"input": q, "response": t.strip()} for q, t in zip(questions, gen.texts)]


def aligners(*, output_dir: str, criteria: Sequence[str] = CRITERIA,
             aligner_data: str | None = None, inspector_data: str | None = None,
             teacher: str | None = None, sdg_kwargs: Mapping[str, Any] | None = None,
             encoder: str = "tiny", aligner_base: str = "tiny",
             responses: str | None = None, prompts: str | None = None,
             generate_from: str | None = None, threshold: float = 0.5,
             inspector_epochs: int = 4, inspector_learning_rate: float = 2e-5,
             inspector_batch_size: int = 8, inspector_max_length: int = 256,
             aligner_steps: int = 100, aligner_learning_rate: float = 1e-5,
             aligner_batch_size: int = 8, seq_len: int = 512, max_new_tokens: int = 256,
             mesh: sharding.MeshSpec | None = None, rules: str = "dp",
             num_samples: int = 3, seed: int = 0, progress: bool = True,
             ablation: bool = True, judge: str | None = None, judge_template: str = "pairwise",
             judge_rubric: str = aligners_eval.DEFAULT_RUBRIC,
             judge_max_tokens: int | None = None, rewrite_encoder: str | None = None,
             max_rewrite_cosine: float = 0.9) -> dict[str, Any]:
    """Trains inspectors and aligners per criterion, runs the squad, writes report.md.

    Args:
      output_dir: run folder (stages resume; see the module docstring).
      criteria: criteria to train; those without data are skipped with a message.
      aligner_data: JSONL of aligner triples; None generates them with `teacher`.
      inspector_data: JSONL of inspector records; None derives them from the triples.
      teacher: "local:<HF dir>" or "openai:<URL>" for the SDG stage.
      sdg_kwargs: extra arguments of `sdg.pipeline.run_aligner_sdg`.
      encoder: the inspectors' starting encoder dir, or "tiny" (a small random BERT over the
        data's words).
      aligner_base: the aligners' starting decoder dir, or a preset name starting with "tiny"
        (random init, tokenizer trained on the data).
      responses: JSONL of {input, response} to align; or `prompts` plus `generate_from`.
      prompts: JSONL with input/prompt fields whose answers by `generate_from` are aligned.
      generate_from: a model dir whose greedy answers to `prompts` are aligned.
      threshold: the squad's threshold.
      inspector_epochs, inspector_learning_rate, inspector_batch_size, inspector_max_length:
        inspector training (paper: 4 epochs, 2e-5, batch 8).
      aligner_steps, aligner_learning_rate, aligner_batch_size, seq_len: aligner training.
      max_new_tokens: aligner (and sampling) budget.
      mesh, rules: devices.
      num_samples: side-by-side samples in the report.
      seed: every stage's seed.
      progress: progress bars.
      ablation: also apply each aligner to every row, without the inspectors (the paper's
        individual-aligner setting).
      judge: a Teacher spec ("local:<dir>", "openai:<URL>") or "letters:<dir or name>" that
        compares each setting's responses with the original ones (win rates, both orders);
        None skips it.
      judge_template, judge_rubric, judge_max_tokens: how the judge is asked
        (`eval.judge`; "pairwise" has no reference answer).
      rewrite_encoder: an encoder (dir or named model, e.g. "all-minilm-l6-v2"): triples whose
        y and y' have sentence-embedding cosine >= `max_rewrite_cosine` are dropped before
        training, as the reference code filters; None keeps every triple.
      max_rewrite_cosine: that threshold.
    Returns:
      The report dict (also report.json).
    """
    out = os.path.abspath(output_dir)
    os.makedirs(out, exist_ok=True)
    triples, records = _data(out, aligner_data=aligner_data, inspector_data=inspector_data,
                             teacher=teacher, sdg_kwargs=sdg_kwargs,
                             rewrite_encoder=rewrite_encoder,
                             max_rewrite_cosine=max_rewrite_cosine)
    by_crit = collections.Counter(t["criterion"] for t in triples)
    active = [c for c in criteria if by_crit[c]]
    for c in criteria:
        if not by_crit[c]:
            _say(f"criterion {c}: no aligner triples, skipped")
    if not active:
        raise ValueError(f"aligners: no aligner triples for any of {list(criteria)}")
    rows = _responses(out, responses=responses, prompts=prompts, generate_from=generate_from,
                      max_new_tokens=max_new_tokens, mesh=mesh)
    texts = [t[k] for t in triples for k in ("input", "initial_response", "aligned_response")]
    texts += [r[k] for r in rows for k in ("input", "response")]

    enc_dir = resolve_model_path(encoder)
    if encoder == "tiny":
        enc_dir = insp.build_tiny_encoder(texts, os.path.join(out, "tiny_encoder"),
                                          max_length=inspector_max_length, seed=seed)
    inspector_dirs, inspector_metrics = {}, {}
    for c in active:
        d = os.path.join(out, "inspectors", c)
        if not os.path.exists(os.path.join(d, "metrics.json")):
            _say(f"stage inspector {c}: fine-tuning {encoder} on "
                 f"{sum(r['criterion'] == c for r in records)} records")
            with interrupts.phase("inspector"):
                insp.train_inspector(records, encoder_dir=enc_dir, output_dir=d, criterion=c,
                                     num_epochs=inspector_epochs,
                                     learning_rate=inspector_learning_rate,
                                     batch_size=inspector_batch_size,
                                     max_length=inspector_max_length, seed=seed, mesh=mesh,
                                     rules=rules)
        inspector_dirs[c] = d
        with open(os.path.join(d, "metrics.json")) as f:
            inspector_metrics[c] = json.load(f)

    base = _aligner_base(out, aligner_base=aligner_base, texts=texts, seed=seed)
    aligner_dirs = {}
    for c in active:
        d = os.path.join(out, "aligners", c)
        if not os.path.exists(os.path.join(d, "hf", "config.json")):
            data = write_jsonl(os.path.join(out, "data", f"aligner_{c}.jsonl"),
                                [t for t in triples if t["criterion"] == c])
            _say(f"stage aligner {c}: {aligner_steps} steps on {by_crit[c]} triples from {base}")
            with interrupts.phase("train"):
                train_main(output_dir=d, data=data, objective="aligner", init_from=base,
                           seq_len=seq_len, batch_size=aligner_batch_size, pack=False,
                           num_steps=aligner_steps, mesh=mesh, rules=rules, seed=seed,
                           optimizer=OptimizerConfig(learning_rate=aligner_learning_rate,
                                                     warmup_steps=max(1, aligner_steps // 10),
                                                     schedule="cosine"),
                           save_every=max(aligner_steps, 1), progress=progress)
        aligner_dirs[c] = os.path.join(d, "hf")

    mesh_ = sharding.make_mesh(mesh) if mesh is not None else None
    # Every aligner decodes in batches of one size (the squad's, as generate would pick for
    # all rows), whatever number of rows it rewrites: the aligners share one config, so one
    # prefill and one decode compile serve all of them.
    batch = min(next_pow2(len(rows)), DEFAULT_BATCH_SIZE)
    models: dict[str, dict] = {}

    def loaded():
        if not models:
            def make_aligner(path):
                config, params = load_hf(path)
                tok = load_tokenizer(path)
                return lambda xs, ys: align(config, params, tok, xs, ys,
                                            max_new_tokens=max_new_tokens, mesh=mesh_,
                                            batch_size=batch)
            models["inspectors"] = {c: insp.make_inspector(inspector_dirs[c]) for c in active}
            models["aligners"] = {c: make_aligner(aligner_dirs[c]) for c in active}
        return models["inspectors"], models["aligners"]

    inputs, originals = [r["input"] for r in rows], [r["response"] for r in rows]
    squad_file = os.path.join(out, "squad.jsonl")
    if not os.path.exists(squad_file):
        inspect_fns, align_fns = loaded()
        _say(f"stage squad: {len(rows)} rows, threshold {threshold}")
        with interrupts.phase("squad"):
            result = squad(inputs, originals, inspectors=inspect_fns, aligners=align_fns,
                           threshold=threshold)
        write_jsonl(squad_file, [
            {"input": r["input"], "response": r["response"], "aligned": y, "applied": list(a),
             "trace": result.trace(i), "order": list(result.order)}
            for i, (r, y, a) in enumerate(zip(rows, result.responses, result.applied))])
    squad_rows = _read_jsonl(squad_file)
    ablation_file = os.path.join(out, "ablation.jsonl")
    if ablation and not os.path.exists(ablation_file):
        inspect_fns, align_fns = loaded()
        _say(f"stage ablation: each of {len(active)} aligners on all {len(rows)} rows")
        with interrupts.phase("ablation"):
            abl = aligners_eval.ablation(inputs, originals, aligners=align_fns,
                                         inspectors=inspect_fns)
        write_jsonl(ablation_file, [
            {"input": x, "response": y, "aligned": {c: abl[c]["responses"][i] for c in abl},
             "scores": {c: {k: float(v[i]) for k, v in abl[c]["scores"].items()} for c in abl}}
            for i, (x, y) in enumerate(zip(inputs, originals))])
    ablation_rows = _read_jsonl(ablation_file) if ablation else []
    judged = None
    if judge:
        judge_file = os.path.join(out, "judge.json")
        settings = {"squad": [r["aligned"] for r in squad_rows]}
        settings.update({f"ablation:{c}": [r["aligned"][c] for r in ablation_rows]
                         for c in active if ablation_rows})
        asked = {"judge": judge, "template": judge_template, "rubric": judge_rubric,
                 "settings": sorted(settings)}
        if os.path.exists(judge_file):
            with open(judge_file) as f:
                judged = json.load(f)
            if {k: judged.get(k) for k in asked} != asked:
                judged = None
        if judged is None:
            _say(f"stage judge: {len(settings)} settings x {len(rows)} rows, both orders, "
                 f"by {judge}")
            teacher_ = (LetterJudge(judge.partition(":")[2], mesh=mesh_)
                        if judge.startswith("letters:") else make_teacher(judge))
            with interrupts.phase("judge"):
                judged = {**asked, "win_rates": aligners_eval.judge_settings(
                    inputs, originals, settings, judge=teacher_, template=judge_template,
                    rubric=judge_rubric, seed=seed, max_tokens=judge_max_tokens)}
            atomic_write(judge_file, json.dumps(judged, indent=1))
    with interrupts.phase("report"):
        report = _report(out, squad_rows, active, threshold=threshold,
                         inspector_metrics=inspector_metrics, num_samples=num_samples,
                         ablation_rows=ablation_rows, judged=judged)
    _say(f"report: {os.path.join(out, 'report.md')}")
    return report


def _report(out, rows, criteria, *, threshold, inspector_metrics, num_samples,
            ablation_rows=(), judged=None) -> dict:
    n = len(rows)
    before = {c: 0.0 for c in criteria}
    after = {c: 0.0 for c in criteria}
    touched = collections.Counter()
    for r in rows:
        trace = r["trace"]
        for c in criteria:
            first = trace[0]["before"][c] if trace else None
            last = trace[-1]["after"][c] if trace else None
            before[c] += first >= threshold
            after[c] += last >= threshold
        touched.update(r["applied"])
    pass_before = {c: before[c] / max(n, 1) for c in criteria}
    pass_after = {c: after[c] / max(n, 1) for c in criteria}
    order = rows[0]["order"] if rows else []
    lines = ["# Aligner squad report", "",
             f"{n} rows; threshold {threshold}; aligners ran in the order "
             f"{', '.join(order)} (ascending mean initial inspector score).", "",
             "## Inspector pass rates (score >= threshold)", "",
             "| criterion | before | after | rows touched by its aligner |", "|---|---|---|---|"]
    for c in criteria:
        lines.append(f"| {c} | {pass_before[c]:.3f} | {pass_after[c]:.3f} | {touched[c]} |")
    lines += ["", "## Inspectors (held-out)", "",
              "| criterion | train | held out | accuracy | ROC-AUC | ECE |",
              "|---|---|---|---|---|---|"]
    for c in criteria:
        m = inspector_metrics[c]
        lines.append(f"| {c} | {m['train_rows']} | {m['heldout_rows']} | {m['accuracy']:.3f} | "
                     f"{m['roc_auc']:.3f} | {m['ece']:.3f} |")
    ablation_pass = {c: aligners_eval.pass_rates(
        {k: [r["scores"][c][k] for r in ablation_rows] for k in criteria}, threshold=threshold)
        for c in criteria if ablation_rows}
    lines += ["", "Reliability plots: inspectors/<criterion>/reliability.png", ""]
    lines += aligners_eval.markdown(
        criteria=criteria, squad_pass=pass_after, ablation_pass=ablation_pass,
        win_rates=(judged or {}).get("win_rates"), judge=(judged or {}).get("judge"),
        template=(judged or {}).get("template"))
    lines += ["## Samples (rewritten rows first)", ""]
    shown = sorted(range(n), key=lambda i: not rows[i]["applied"])[:num_samples]
    for i in shown:
        r = rows[i]
        lines += [f"### Row {i} (aligners: {', '.join(r['applied']) or 'none'})", "",
                  f"**Input:** {r['input']}", "", f"**Before:** {r['response']}", "",
                  f"**After:** {r['aligned']}", ""]
    atomic_write(os.path.join(out, "report.md"), "\n".join(lines) + "\n")
    report = {"rows": n, "threshold": threshold, "order": order, "pass_before": pass_before,
              "pass_after": pass_after, "rows_touched": dict(touched),
              "ablation_pass": ablation_pass, "judge": judged,
              "inspectors": {c: {k: v for k, v in m.items() if k != "bins"}
                             for c, m in inspector_metrics.items()}}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report
