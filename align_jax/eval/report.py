"""Evaluate several checkpoints on the same held-out records; write report.md and report.png."""

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from align_jax.eval.scoring import answer_nll, preference_accuracy
from align_jax.tokenizer import encode_prompt


def _samples(config, params, tokenizer, prompts, *, max_new_tokens):
    from align_jax.generate import generate
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    out = generate(config, params, ids, max_new_tokens=max_new_tokens, tokenizer=tokenizer)
    return out.texts


def _metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(out_dir: str, report: Mapping, stages: Mapping[str, str]) -> str:
    """report.png: training loss per stage and held-out metrics per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for folder, label in stages.items():
        rows = [r for r in _metrics(os.path.join(out_dir, folder, "metrics.jsonl")) if "loss" in r]
        if rows:
            axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[0].legend()
    names = list(report["models"])
    nll = [report["models"][n]["answer_nll"]["nll_per_token"] for n in names]
    rag = [report["models"][n].get("answer_nll_rag", {}).get("nll_per_token", np.nan)
           for n in names]
    x = np.arange(len(names))
    axes[1].bar(x - 0.2, nll, 0.4, label="question only")
    axes[1].bar(x + 0.2, rag, 0.4, label="+ 1 retrieved chunk (RAG)")
    axes[1].set(title="held-out answer NLL / token (lower is better)", xticks=x)
    axes[1].set_xticklabels(names, rotation=15)
    axes[1].legend()
    acc = [report["models"][n]["preference"]["accuracy"] for n in names]
    axes[2].bar(x, acc, 0.5)
    axes[2].axhline(0.5, color="gray", linestyle="--", linewidth=1)
    axes[2].set(title="held-out preference accuracy (log p chosen > rejected)", xticks=x,
                ylim=(0, 1))
    axes[2].set_xticklabels(names, rotation=15)
    fig.tight_layout()
    path = os.path.join(out_dir, "report.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_models(out_dir: str, *, models: Mapping[str, str], tokenizer, sft_test: Sequence,
                    pref_test: Sequence, retriever=None, rag_models: Sequence[str] = (),
                    reference: tuple[str, str] | None = None, seq_len: int = 256,
                    num_samples: int = 3, max_new_tokens: int = 40,
                    stages: Mapping[str, str] | None = None) -> dict:
    """Scores each model (name -> HF dir) on the held-out records and writes the report.

    Args:
      out_dir: where report.md and report.png go.
      models: display name -> Hugging Face checkpoint dir.
      tokenizer: the tokenizer all models share.
      sft_test, pref_test: held-out SFT and preference records.
      retriever: an `align_jax.eval.retrieval.Retriever` for the RAG baseline rows.
      rag_models: models also scored with one retrieved chunk in the prompt.
      reference: (policy, reference) names: also report DPO's implicit-reward accuracy.
      seq_len: scoring length.
      num_samples, max_new_tokens: greedy answers to the first held-out questions.
      stages: run sub-folder -> model name, for the loss curves.
    Returns:
      The report dict.
    """
    from align_jax.eval.retrieval import with_retrieval
    from align_jax.models.hf import load_hf
    report = {"models": {}, "samples": {}}
    loaded = {}
    prompts = [r["prompt"] for r in list(sft_test)[:num_samples]]
    for name, path in models.items():
        config, params = load_hf(path)
        loaded[name] = (config, params)
        row = {"answer_nll": answer_nll(config, params, tokenizer, sft_test, seq_len=seq_len),
               "preference": preference_accuracy(config, params, tokenizer, pref_test,
                                                 seq_len=seq_len)}
        if retriever is not None and name in rag_models:
            row["answer_nll_rag"] = answer_nll(config, params, tokenizer,
                                               with_retrieval(sft_test, retriever),
                                               seq_len=seq_len)
        report["models"][name] = row
        if prompts:
            report["samples"][name] = _samples(config, params, tokenizer, prompts,
                                               max_new_tokens=max_new_tokens)
    if reference is not None and all(n in loaded for n in reference):
        report["implicit_reward"] = preference_accuracy(
            *loaded[reference[0]], tokenizer, pref_test, seq_len=seq_len,
            reference=loaded[reference[1]])
    _write_markdown(out_dir, report, prompts, reference)
    if stages:
        plot(out_dir, report, stages)
    return report


def _write_markdown(out_dir, report, prompts, reference):
    lines = ["# Value alignment report", "",
             "Held-out records (never trained on). NLL is per answer token; preference "
             "accuracy is how often log p(chosen) > log p(rejected).", "",
             "| model | answer NLL | answer NLL + RAG | preference accuracy | mean margin |",
             "|---|---|---|---|---|"]
    for name, row in report["models"].items():
        rag = row.get("answer_nll_rag", {}).get("nll_per_token")
        lines.append(f"| {name} | {row['answer_nll']['nll_per_token']:.3f} | "
                     f"{'-' if rag is None else f'{rag:.3f}'} | "
                     f"{row['preference']['accuracy']:.2f} | "
                     f"{row['preference']['mean_margin']:.2f} |")
    if "implicit_reward" in report:
        ir = report["implicit_reward"]
        lines += ["", f"DPO implicit reward ({reference[0]} vs {reference[1]}) ranks the chosen "
                      f"answer first for {ir['accuracy']:.2f} of held-out pairs "
                      f"(mean margin {ir['mean_margin']:.2f} nats)."]
    first = next(iter(report["models"].values()), None)
    if first is not None:
        lines += ["", f"{first['answer_nll']['examples']} held-out SFT records, "
                      f"{first['preference']['examples']} held-out preference pairs."]
    for i, p in enumerate(prompts):
        lines += ["", f"## Sample {i + 1}: {p}", ""]
        for name, texts in report["samples"].items():
            lines.append(f"- **{name}**: {texts[i].strip()!r}")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
