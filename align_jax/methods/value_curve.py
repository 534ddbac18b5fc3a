"""How held-out yes/no accuracy grows with SDG records and SFT steps: a learning curve.

    align-jax run --gin_file=configs/runs/value_alignment_curve.gin --output_dir=runs/curve

SDG runs once, as in the value-alignment recipe (the same `value_data.gather`, so the same
leak guard against the held-out questions). For each share of the SDG records (a balanced
subset: as many "yes" as "no" answers), SFT trains from the base model at a constant
learning rate and the model answers the held-out yes/no questions after each of `steps`
(one run resumed further each time, so the point at 60 steps continues the 30-step run).
Writes curve.csv and curve.png: accuracy with its 95% bootstrap interval per (records,
steps), beside the better constant answer. It answers "would more data or more steps help
the demo?" with numbers instead of a guess.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from align_jax import sharding
from align_jax.eval.answers import generate_answers
from align_jax.eval.bootstrap import mean_interval
from align_jax.eval.evidence import answer_polarity, yes_no_prompt
from align_jax.eval.report import YES_NO_INSTRUCTION
from align_jax.jsonl import write_jsonl
from align_jax.methods import value_data
from align_jax.models.hf import load_hf
from align_jax.models.named import resolve_model_path
from align_jax.tokenizer import load_tokenizer
from align_jax.train.entry import train_main
from align_jax.train.optim import OptimizerConfig


def _say(msg: str) -> None:
    print(f"[value_curve] {msg}", flush=True)


def _balanced_share(rows: Sequence[dict], share: float) -> list[dict]:
    """`share` of the records, as many "yes" as "no" answers, chosen by a hash of the prompt."""
    key = (lambda r: hashlib.sha256(r["prompt"].encode()).digest())
    by = {a: sorted((r for r in rows if r.get("answer") == a), key=key) for a in ("yes", "no")}
    n = int(round(share * min(len(v) for v in by.values())))
    return by["yes"][:n] + by["no"][:n]


def yes_no_accuracy(model_dir: str, tokenizer, questions: Sequence[Mapping], *,
                    instruction: str | None, max_new_tokens: int, mesh=None,
                    rules: str = "dp") -> dict[str, Any]:
    """Accuracy (and its 95% bootstrap interval) of a checkpoint's greedy yes/no answers."""
    config, params = load_hf(model_dir, mesh=mesh, rules=rules)
    prompts = [yes_no_prompt(q["question"], instruction) for q in questions]
    answers = generate_answers(config, params, tokenizer, {"q": prompts},
                               max_new_tokens=max_new_tokens, mesh=mesh, rules=rules)["q"]
    right = [float(answer_polarity(a) == q["answer"]) for a, q in zip(answers, questions)]
    ci = mean_interval(right)
    return {"accuracy": ci.estimate, "ci_low": ci.low, "ci_high": ci.high,
            "said_yes": sum(answer_polarity(a) == "yes" for a in answers),
            "unclear": sum(answer_polarity(a) is None for a in answers)}


def value_curve(*, output_dir: str, document: str, init_from: str, teacher: str,
                yes_no_test: str, sdg_kwargs: Mapping[str, Any] | None = None,
                teacher_kwargs: Mapping[str, Any] | None = None,
                shares: Sequence[float] = (0.25, 0.5, 1.0), steps: Sequence[int] = (30, 60, 120),
                seq_len: int = 96, batch_size: int = 8, learning_rate: float = 3e-4,
                mesh: sharding.MeshSpec | None = None, rules: str = "dp", seed: int = 0,
                yes_no_instruction: str | None = YES_NO_INSTRUCTION,
                yes_no_max_new_tokens: int = 8, sdg_from: str | None = None,
                progress: bool = False) -> dict[str, Any]:
    """SDG once, then SFT on growing shares of the records, scored after each of `steps`.

    Args:
      output_dir: run folder (sdg/, data/, sft_<share>/, curve.csv, curve.png).
      document, init_from, teacher, sdg_kwargs, teacher_kwargs: as `value_alignment`.
      yes_no_test: the held-out yes/no questions.
      shares: shares of the (balanced) SDG SFT records to train on.
      steps: SFT steps after which the model is scored (increasing).
      seq_len, batch_size, learning_rate: SFT shapes and its constant rate (10% warmup).
      mesh, rules, seed: as `value_alignment`.
      yes_no_instruction, yes_no_max_new_tokens: how the questions are asked.
      sdg_from: a finished SDG folder (a value-alignment run's `sdg/`) copied in as this
        run's `sdg/` when it has none; its settings must match `sdg_kwargs` (SDG resumes,
        so nothing is asked of the teacher again), else one line names the difference.
      progress: progress bars.
    Returns:
      {"points": [{share, records, steps, accuracy, ci_low, ci_high, ...}], "constant": float}
    """
    steps = sorted(int(s) for s in steps)
    if not steps or steps[0] < 1 or not shares or min(shares) <= 0 or max(shares) > 1:
        raise ValueError(f"value_curve: steps must be positive and shares in (0, 1], got "
                         f"steps={steps}, shares={list(shares)}")
    out = os.path.abspath(output_dir)
    init_from = resolve_model_path(init_from)
    tok = load_tokenizer(init_from)
    questions = value_data.records(yes_no_test, "yes_no")
    if sdg_from is not None and not os.path.exists(os.path.join(out, "sdg")):
        src = os.path.abspath(sdg_from)
        if not os.path.exists(os.path.join(src, "raw", "settings.json")):
            raise ValueError(f"value_curve.sdg_from: {src} holds no SDG run "
                             "(no raw/settings.json)")
        shutil.copytree(src, os.path.join(out, "sdg"))
        _say(f"SDG records from {src}")
    data = value_data.gather(out, document=document, teacher=teacher, tokenizer=tok,
                             sdg_kwargs=sdg_kwargs or {}, teacher_kwargs=teacher_kwargs,
                             sft_data=None, preference_data=None, train_on=("sdg",),
                             sft_test=None, preference_test=None, heldout_fraction=0.0,
                             heldout_questions=[q["question"] for q in questions])
    mesh_obj = sharding.make_mesh(mesh or sharding.MeshSpec())
    yes = sum(q["answer"] == "yes" for q in questions) / len(questions)
    ask = dict(instruction=yes_no_instruction, max_new_tokens=yes_no_max_new_tokens,
               mesh=mesh_obj, rules=rules)
    base = yes_no_accuracy(init_from, tok, questions, **ask)
    points = [{"share": 0.0, "records": 0, "steps": 0, **base}]
    _say(f"base model: yes/no accuracy {base['accuracy']:.3f}")
    for share in shares:
        rows = _balanced_share(data.sft_train, share)
        path = os.path.join(out, "data", f"sft_{share:g}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(path, rows)
        run = os.path.join(out, f"sft_{share:g}")
        for n in steps:
            train_main(output_dir=run, data=path, objective="sft", init_from=init_from,
                       seq_len=seq_len, batch_size=batch_size, num_steps=n, mesh=mesh,
                       rules=rules, seed=seed, save_every=n, progress=progress,
                       optimizer=OptimizerConfig(learning_rate=learning_rate,
                                                 warmup_steps=max(1, steps[0] // 10),
                                                 schedule="constant"))
            point = {"share": share, "records": len(rows), "steps": n,
                     **yes_no_accuracy(os.path.join(run, "hf"), tok, questions, **ask)}
            points.append(point)
            _say(f"{len(rows)} records, {n} steps: yes/no accuracy {point['accuracy']:.3f} "
                 f"[{point['ci_low']:.3f}, {point['ci_high']:.3f}]")
    constant = max(yes, 1 - yes)
    _write(out, points, constant)
    return {"points": points, "constant": constant}


def _write(out: str, points: list[dict], constant: float) -> None:
    keys = ["share", "records", "steps", "accuracy", "ci_low", "ci_high", "said_yes", "unclear"]
    with open(os.path.join(out, "curve.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(keys)
        w.writerows([[p[k] for k in keys] for p in points])
    from align_jax.eval.plots import subplots  # matplotlib: only plots need it
    fig, ax = subplots(figsize=(6.5, 4))
    for records in sorted({p["records"] for p in points if p["steps"]}):
        pts = [p for p in points if p["records"] == records and p["steps"]]
        ax.errorbar([p["steps"] for p in pts], [p["accuracy"] for p in pts],
                    yerr=[[p["accuracy"] - p["ci_low"] for p in pts],
                          [p["ci_high"] - p["accuracy"] for p in pts]],
                    marker="o", capsize=3, label=f"{records} SDG records")
    base = next(p for p in points if not p["steps"])
    ax.axhline(base["accuracy"], color="grey", ls=":", label="base model")
    ax.axhline(constant, color="black", ls="--", label="best constant answer")
    ax.set(xlabel="SFT steps", ylabel="held-out yes/no accuracy", ylim=(0, 1),
           title="Yes/no accuracy vs SDG records and SFT steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=120)
