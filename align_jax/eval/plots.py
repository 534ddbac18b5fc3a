"""The report's pictures: training curves, held-out metrics per system, win-rate heatmap.

Each figure has a title, axis labels with units and a legend or colour bar, so it reads
without the code.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np

from align_jax.atomic import atomic_write
from align_jax.jsonl import read_jsonl


def subplots(*args, figsize=None, **kwargs):
    """`plt.subplots` on a bare Figure, outside pyplot: a report's picture neither switches
    the caller's backend (`matplotlib.use("Agg")` once silenced a notebook's inline plots)
    nor opens a window, and needs no close.

    Returns:
      (figure, axes) as plt.subplots returns them.
    """
    from matplotlib.figure import Figure  # heavy: only report plots need it
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig, path: str) -> str:
    """Writes the figure as PNG atomically (a reader never sees half a picture)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())
    return path


def _metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return read_jsonl(path)


def _yerr(cells: Sequence) -> np.ndarray | None:
    """Asymmetric error bars [2, n] from interval dicts (0 where an interval is missing)."""
    if not any(cells):
        return None
    err = np.zeros((2, len(cells)))
    for i, c in enumerate(cells):
        if c and np.isfinite(c.get("ci_low", np.nan)) and np.isfinite(c.get("estimate", np.nan)):
            err[:, i] = (max(c["estimate"] - c["ci_low"], 0.0),
                         max(c["ci_high"] - c["estimate"], 0.0))
    return err


def plot_overview(out_dir: str, report: Mapping, stages: Mapping[str, str]) -> str:
    """report.png: training loss per stage, held-out answer NLL and preference accuracy
    (the loss alone when the models were not scored teacher-forced), and yes/no accuracy
    when the report has a yes/no section; 95% bootstrap intervals as error bars."""
    names = [n for n, row in report["models"].items() if row]  # scored teacher-forced
    yes_no = report.get("yes_no")
    panels = 1 + 2 * bool(names) + bool(yes_no)
    fig, axes = subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = axes[0]
    for folder, label in stages.items():
        rows = [r for r in _metrics(os.path.join(out_dir, folder, "metrics.jsonl")) if "loss" in r]
        if rows:
            axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    axes[0].set(title="training loss per stage", xlabel="optimizer step",
                ylabel="loss (nats / token; DPO: nats / pair)")
    if axes[0].lines:
        axes[0].legend(title="stage")
    intervals = report.get("intervals", {})
    if names:
        _held_out_panels(axes[1], axes[2], report, names, intervals)
    if yes_no:
        _yes_no_panel(axes[-1], yes_no, [s for s in intervals if s in yes_no["rows"]])
    fig.tight_layout()
    return _save(fig, os.path.join(out_dir, "report.png"))


def _held_out_panels(ax_nll, ax_acc, report: Mapping, names: list[str],
                     intervals: Mapping) -> None:
    """Held-out answer NLL (plain and RAG) and preference accuracy per model, with the
    best shortcut rule's accuracy as a line."""
    models = report["models"]
    rag_names = [n + " + RAG" for n in names]
    nll = [models[n]["answer_nll"]["nll_per_token"] for n in names]
    rag = [models[n].get("answer_nll_rag", {}).get("nll_per_token", np.nan) for n in names]
    x = np.arange(len(names))
    ax_nll.bar(x - 0.2, nll, 0.4, label="question only", capsize=3,
               yerr=_yerr([intervals.get(n, {}).get("answer_nll") for n in names]))
    ax_nll.bar(x + 0.2, rag, 0.4, label="+ 1 retrieved chunk (RAG)", capsize=3,
               yerr=_yerr([intervals.get(n, {}).get("answer_nll") for n in rag_names]))
    ax_nll.set(title="held-out answer NLL (lower is better)", xticks=x,
               ylabel="nats / answer token")
    ax_nll.set_xticklabels(names, rotation=15)
    ax_nll.legend()
    acc = np.array([models[n]["preference"]["accuracy"] for n in names])
    pairs = max(models[n]["preference"].get("examples", 0) for n in names)
    ax_acc.bar(x, acc, 0.5, capsize=4,
               yerr=_yerr([intervals.get(n, {}).get("preference_accuracy") for n in names]),
               label="log p(chosen) > log p(rejected), 95% interval")
    ax_acc.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
    ev = report.get("preference_evidence")
    if ev:
        best = ev["best_shortcut"]
        ax_acc.axhline(ev["rows"][best]["estimate"], color="tab:red", linestyle=":",
                       linewidth=1.5, label=f"best shortcut: {best}")
    ax_acc.set(title=f"held-out preference accuracy ({pairs} pairs)", xticks=x, ylim=(0, 1),
               ylabel="share of pairs")
    ax_acc.set_xticklabels(names, rotation=15)
    ax_acc.legend(fontsize=8)


def _yes_no_panel(ax, yes_no: Mapping, systems: Sequence[str]) -> None:
    """Yes/no accuracy per system (95% intervals) against the better constant answer."""
    rows = yes_no["rows"]
    x = np.arange(len(systems))
    cells = [rows[s]["accuracy"] for s in systems]
    colors = ["tab:orange" if s.endswith("+ RAG") else "tab:blue" for s in systems]
    ax.bar(x, [c["estimate"] for c in cells], 0.6, color=colors, capsize=4,
           yerr=_yerr(cells))
    best = yes_no["best_constant"]
    ax.axhline(rows[best]["accuracy"]["estimate"], color="tab:red", linestyle=":",
               linewidth=1.5, label=f"{best} (constant answer)")
    ax.set(title=f"yes/no accuracy ({yes_no['questions']} questions, "
                 f"yes share {yes_no['yes_share']:.2f})", xticks=x, ylim=(0, 1),
           ylabel="share answered right (unclear = wrong)")
    ax.set_xticklabels(systems, rotation=30, ha="right")
    ax.legend(fontsize=8)


def plot_metrics(path: str, metrics: Mapping[str, Mapping[str, float]], *,
                 intervals: Mapping | None = None, yes_no: Mapping | None = None) -> str:
    """Reference metrics of every system's generated answers, one panel per metric, with
    95% bootstrap intervals as error bars when given, and a yes/no accuracy panel."""
    panels = [("bleu", "SacreBLEU", "BLEU (0-100)"), ("rougeL", "ROUGE-L F1", "F-measure (0-1)"),
              ("bertscore_f1", "BERTScore F1", "F1 (cosine, 0-1)")]
    panels = [p for p in panels if any(p[0] in m for m in metrics.values())]
    systems = list(metrics)
    n_panels = len(panels) + bool(yes_no)
    fig, axes = subplots(1, max(n_panels, 1), figsize=(5 * max(n_panels, 1), 4),
                             squeeze=False)
    colors = ["tab:orange" if s.endswith("+ RAG") else "tab:blue" for s in systems]
    for ax, (key, title, unit) in zip(axes[0], panels):
        vals = [metrics[s].get(key, np.nan) for s in systems]
        err = _yerr([(intervals or {}).get(s, {}).get(key) for s in systems])
        ax.bar(np.arange(len(systems)), vals, color=colors, yerr=err, capsize=3)
        ax.set(title=f"{title} of generated answers vs references", ylabel=unit,
               xticks=np.arange(len(systems)))
        ax.set_xticklabels(systems, rotation=30, ha="right")
    if yes_no:
        _yes_no_panel(axes[0][len(panels)], yes_no,
                      [s for s in (intervals or yes_no["rows"]) if s in yes_no["rows"]
                       and yes_no["rows"][s]["kind"] == "system"])
    from matplotlib.patches import Rectangle
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange")]
    if panels:
        axes[0][0].legend(handles, ["question only", "+ retrieved chunk (RAG)"],
                          title="bars: 95% interval" if intervals else None)
    fig.tight_layout()
    return _save(fig, path)


def plot_win_rates(path: str, matrix: Mapping, *, judge: str = "") -> str:
    """Heatmap of judged win rates (row over column) with 95% intervals in each cell."""
    names: Sequence[str] = matrix["names"]
    w = np.asarray(matrix["win_rate"], float)
    lo, hi = np.asarray(matrix["ci_low"], float), np.asarray(matrix["ci_high"], float)
    s = len(names)
    fig, ax = subplots(figsize=(1.6 * s + 3, 1.3 * s + 2))
    im = ax.imshow(w, vmin=0, vmax=1, cmap="RdBu")
    for i in range(s):
        for j in range(s):
            text = ("-" if i == j else "n/a" if not np.isfinite(w[i, j])
                    else f"{w[i, j]:.2f}\n[{lo[i, j]:.2f}, {hi[i, j]:.2f}]")
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if abs(w[i, j] - 0.5) > 0.3 else "black")
    ax.set_xticks(range(s))
    ax.set_yticks(range(s))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_yticklabels(names)
    ax.set(xlabel="column system (B)", ylabel="row system (A)",
           title="judged win rate of row over column, 95% interval" +
                 (f"\njudge: {judge}" if judge else ""))
    fig.colorbar(im, ax=ax, label="win rate of A over B (ties count 1/2)")
    fig.tight_layout()
    return _save(fig, path)
