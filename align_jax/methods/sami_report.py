"""The SAMI run's report: report.md (tables) and report.png (plots) from report.json's dict.

Per iteration: the held-out MI bound and the reference code's estimate (not a bound), each
with its standard error, the mean response length under each constitution (with how many
responses the token budget cut), and the win rates under the desired constitution against
the base model and the compared model, each raw, length-controlled (stratified as in the
paper, and by regression), with the judge's position bias; and where the time went.
"""

from __future__ import annotations

import math
import os

from align_jax.atomic import atomic_write

PHASES = ("train", "sample", "mi", "judge")
MATCHUPS = (("win_rate_vs_base", "vs base"), ("win_rate_vs_compare", "vs compare_to"))


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _names(report: dict) -> list[str]:
    names = list(report.get("constitutions") or [])
    for r in report["iterations"]:
        names += [n for n in r.get("response_tokens_by_constitution", {}) if n not in names]
    # Only the constitutions the held-out responses were sampled under.
    seen = {n for r in report["iterations"] for n in r.get("response_tokens_by_constitution",
                                                              {})}
    return [n for n in names if n in seen] or names


def _length(v: dict | None) -> str:
    if not v:
        return "-"
    return f"{_num(v['mean'], '.1f')} +- {_num(v['stderr'], '.1f')} ({v['truncated']}/{v['n']})"


WIN_COLUMNS = ("win rate", "LC strat.", "LC reg.", "longer", "position bias", "parse")


def _win_cells(w: dict | None) -> list[str]:
    if not w:
        return ["-"] * len(WIN_COLUMNS)
    return [f"{_num(w['win_rate'], '.2f')} +- {_num(w['stderr'], '.2f')}",
            _num(w.get("lc_stratified"), ".2f"), _num(w.get("lc_win_rate"), ".2f"),
            _num(w.get("a_longer_share"), ".2f"), _num(w.get("position_bias"), ".2f"),
            f"{w.get('parse_failures', 0)}/{w.get('n_judgements', 0)}"]


def markdown(report: dict) -> str:
    """report.md's text."""
    rows, names = report["iterations"], _names(report)
    k = max((r.get("mi_constitutions", 0) for r in rows), default=0)
    head = ["iteration", "steps", "MI bound (nats)", "+- se", "reference estimate (not a bound)",
            "+- se", "per-token bound"]
    head += [f"tokens: {n} (cut)" for n in names]
    head += ["kept", "dropped", "seconds"]
    lines = ["# SAMI report", "",
             f"init={report['init']}, prompt_format={report['prompt_format']}"
             f"{', example_format' if report.get('example_format') else ''}, optimizer="
             f"{report.get('optimizer', 'adamw')}, responses cut at "
             f"{report.get('max_new_tokens', '?')} tokens.", "",
             "## Mutual information and response lengths (held out)", "",
             f"Each held-out query answered under {k or '?'} constitutions and scored under "
             f"each. " + report["mi_bound_note"] + f". log K = {_num(math.log(k) if k else None)}"
             ". Token counts are means (+- se) with the responses cut at the budget.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lengths = r.get("response_tokens_by_constitution", {})
        cells = [str(r["iteration"]), str(r.get("steps", 0)), _num(r["mi_bound"], ".4f"),
                 _num(r["mi_bound_stderr"], ".4f"), _num(r.get("mi_reference"), ".4f"),
                 _num(r.get("mi_reference_stderr"), ".4f"), _num(r["mi_bound_token_mean"], ".4f")]
        cells += [_length(lengths.get(n)) for n in names]
        cells += [str(r.get("kept_queries", "-")), str(r.get("dropped", "-")),
                  str(r.get("seconds", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    judged = [r for r in rows if any(key in r for key, _ in MATCHUPS)]
    if report.get("eval_constitution"):
        compare = report.get("compare_to")
        lines += ["", f"## Win rates under the constitution {report['eval_constitution']!r}", "",
                  f"Every held-out query answered under the one desired constitution; judge "
                  f"{report.get('judge') or '(none)'} with template "
                  f"{report.get('judge_template') or '-'}, both orders of every pair. Win rate "
                  "+- se; LC strat. = the paper's length correction (the mean of the win rates "
                  "where this iteration's response is longer and where it is not; - when one "
                  "of the two is empty); LC reg. = regression on the length difference, read "
                  "at zero; longer = share of pairs where this iteration's response is longer "
                  "(words); position bias = share of pairs whose two orders chose the same slot "
                  "(1: always one slot); parse = unparsed verdicts / judgements."
                  + (f" compare_to = {compare} (mean response tokens "
                     f"{_length(report.get('compare_to_response_tokens'))})." if compare
                     else ""), ""]
        head = ["iteration", "tokens (cut)"]
        for _, label in MATCHUPS:
            head += [f"{label}: {WIN_COLUMNS[0]}", *WIN_COLUMNS[1:]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [str(r["iteration"]), _length(r.get("eval_response_tokens"))]
            for key, _ in MATCHUPS:
                cells += _win_cells(r.get(key))
            lines.append("| " + " | ".join(cells) + " |")
        if not judged:
            lines += ["", "(no judge: no win rates)"]
    lines += ["", "Seconds per phase, wall / CPU (all threads): train = making this "
              "iteration's model; sample = its held-out responses and the next iteration's "
              "training data (one generation call); mi = the estimates; judge = the win rates.",
              "", "| iteration | " + " | ".join(PHASES) + " | total |",
              "|---" * (len(PHASES) + 2) + "|"]
    totals = {"wall": 0.0, "cpu": 0.0}
    for r in rows:
        wall, cpu = r.get("phase_seconds", {}), r.get("phase_cpu_seconds", {})
        totals["wall"] += sum(wall.values())
        totals["cpu"] += sum(cpu.values())
        lines.append(f"| {r['iteration']} | " + " | ".join(
            f"{wall[p]:.0f} / {cpu[p]:.0f}" if p in wall else "-" for p in PHASES)
            + f" | {sum(wall.values()):.0f} / {sum(cpu.values()):.0f} |")
    lines.append(f"| all | {' | '.join('' for _ in PHASES)} | {totals['wall']:.0f} / "
                 f"{totals['cpu']:.0f} |")
    return "\n".join(lines) + "\n"


def _win_panel(ax, rows, key, title):
    pts = [(r["iteration"], r[key]) for r in rows if key in r]
    it = [p[0] for p in pts]
    ax.errorbar(it, [p[1]["win_rate"] for p in pts], yerr=[p[1]["stderr"] for p in pts],
                marker="o", capsize=4, label="win rate")
    ax.plot(it, [p[1]["lc_stratified"] for p in pts], marker="s", ls="--",
            label="LC (stratified, paper)")
    ax.plot(it, [p[1]["lc_win_rate"] for p in pts], marker="^", ls=":", label="LC (regression)")
    ax.axhline(0.5, color="gray", lw=0.5)
    bias = pts[-1][1].get("position_bias", float("nan")) if pts else float("nan")
    ax.set(title=f"{title}\n(position bias {_num(bias, '.2f')})", xlabel="iteration",
           ylim=(0, 1))
    ax.legend(fontsize=7)


def plot(report: dict, path: str) -> None:
    """report.png: MI bound and reference estimate (+- se), response length per constitution
    (+- se), and the win rates under the desired constitution against the base and the
    compared model (raw +- se and both length controls), by iteration."""
    from align_jax.eval.plots import subplots  # matplotlib: only plots need it
    rows, names = report["iterations"], _names(report)
    panels = [key for key, _ in MATCHUPS if any(key in r for r in rows)]
    fig, ax = subplots(1, 2 + len(panels), figsize=(5 * (2 + len(panels)), 3.8))
    it = [r["iteration"] for r in rows]
    ax[0].errorbar(it, [r["mi_bound"] for r in rows],
                   yerr=[r["mi_bound_stderr"] for r in rows], marker="o", capsize=4,
                   label="InfoNCE bound")
    if all("mi_reference" in r for r in rows):
        ax[0].errorbar(it, [r["mi_reference"] for r in rows],
                       yerr=[r["mi_reference_stderr"] for r in rows], marker="s", capsize=4,
                       ls="--", label="reference estimate (not a bound)")
    k = max((r.get("mi_constitutions", 0) for r in rows), default=0) or max(len(names), 2)
    ax[0].axhline(math.log(k), color="gray", ls="--", lw=0.8, label=f"log K = {math.log(k):.2f}")
    ax[0].set(title="MI, held out (summed log p)", xlabel="iteration", ylabel="nats")
    ax[0].legend(fontsize=7)
    for n in names:
        pts = [(r["iteration"], r["response_tokens_by_constitution"][n]) for r in rows
               if n in r.get("response_tokens_by_constitution", {})]
        ax[1].errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                       yerr=[p[1]["stderr"] for p in pts], marker="o", capsize=4, label=n)
    if report.get("max_new_tokens"):
        ax[1].axhline(report["max_new_tokens"], color="gray", ls="--", lw=0.8,
                      label="token budget")
    ax[1].set(title="mean response length, held out", xlabel="iteration", ylabel="tokens")
    ax[1].legend(fontsize=7)
    for a, key in zip(ax[2:], panels):
        label = "base" if key == "win_rate_vs_base" else "compare_to " + os.path.basename(
            str(report.get("compare_to") or "").rstrip("/"))
        _win_panel(a, rows, key, f"win rate vs {label} under "
                                 f"{report.get('eval_constitution', '?')}")
    for a in ax:
        a.set_xticks(it)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(out: str, report: dict) -> str:
    """Writes <out>/report.md and <out>/report.png; returns the markdown."""
    text = markdown(report)
    atomic_write(os.path.join(out, "report.md"), text)
    plot(report, os.path.join(out, "report.png"))
    return text
