"""The SAMI run's report: report.md (tables) and report.png (plots) from report.json's dict.

Per iteration: the held-out MI bound with its standard error, the mean response length under
each constitution (with how many responses the token budget cut), the win rates against the
base model per constitution with the judge's position bias, and where the time went.
"""

from __future__ import annotations

import math
import os

from align_jax.atomic import atomic_write

PHASES = ("train", "sample", "mi", "judge")


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _names(report: dict) -> list[str]:
    names = list(report.get("constitutions") or [])
    for r in report["iterations"]:
        names += [n for n in r.get("response_tokens_by_constitution", {}) if n not in names]
    return names


def markdown(report: dict) -> str:
    """report.md's text."""
    rows, names = report["iterations"], _names(report)
    head = ["iteration", "steps", "MI bound (nats, summed)", "+- se", "per-token MI"]
    head += [f"tokens: {n} (cut)" for n in names]
    head += [f"win rate vs base: {n}" for n in names]
    head += ["position bias", "kept", "dropped", "seconds"]
    lines = ["# SAMI report", "",
             f"init={report['init']}, prompt_format={report['prompt_format']}, responses cut "
             f"at {report.get('max_new_tokens', '?')} tokens. " + report["mi_bound_note"]
             + ". Token counts are held-out means (+- se) with the responses cut at the "
             "budget; win rates (+- se) are judged in both orders against the base model's "
             "responses under the same constitution; position bias is the share of pairs "
             "whose two orders chose the same slot (1: the judge always picks one slot).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lengths = r.get("response_tokens_by_constitution", {})
        wins = r.get("win_rate_vs_base", {}).get("by_constitution", {})
        cells = [str(r["iteration"]), str(r.get("steps", 0)), _num(r["mi_bound"], ".4f"),
                 _num(r["mi_bound_stderr"], ".4f"), _num(r["mi_bound_token_mean"], ".4f")]
        cells += [f"{_num(lengths[n]['mean'], '.1f')} +- {_num(lengths[n]['stderr'], '.1f')} "
                  f"({lengths[n]['truncated']}/{lengths[n]['n']})" if n in lengths else "-"
                  for n in names]
        cells += [f"{_num(wins[n]['win_rate'], '.2f')} +- {_num(wins[n]['stderr'], '.2f')}"
                  if n in wins else "-" for n in names]
        cells += [_num(r.get("win_rate_vs_base", {}).get("position_bias"), ".2f"),
                  str(r.get("kept_queries", "-")), str(r.get("dropped", "-")),
                  str(r.get("seconds", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Seconds per phase, wall / CPU (all threads): train = making this "
              "iteration's model; sample = its held-out responses and the next iteration's "
              "training data (one generation call); mi = the bound; judge = the win rates.", "",
              "| iteration | " + " | ".join(PHASES) + " | total |", "|---" * (len(PHASES) + 2)
              + "|"]
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


def plot(report: dict, path: str) -> None:
    """report.png: MI bound (+- se), response length per constitution (+- se) and win rates
    against the base model per constitution (+- se), by iteration."""
    import matplotlib  # heavy: only the report's figure needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, names = report["iterations"], _names(report)
    judged = [r for r in rows if "win_rate_vs_base" in r]
    fig, ax = plt.subplots(1, 3 if judged else 2, figsize=(14, 3.6))
    it = [r["iteration"] for r in rows]
    ax[0].errorbar(it, [r["mi_bound"] for r in rows],
                   yerr=[r["mi_bound_stderr"] for r in rows], marker="o", capsize=4)
    c = max(len(names), 2)
    ax[0].axhline(math.log(c), color="gray", ls="--", lw=0.8, label=f"log C = {math.log(c):.2f}")
    ax[0].set(title="MI lower bound, held out (summed log p)", xlabel="iteration",
              ylabel="nats")
    ax[0].legend(loc="lower right", fontsize=8)
    for n in names:
        pts = [(r["iteration"], r["response_tokens_by_constitution"][n]) for r in rows
               if n in r.get("response_tokens_by_constitution", {})]
        ax[1].errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                       yerr=[p[1]["stderr"] for p in pts], marker="o", capsize=4, label=n)
    if report.get("max_new_tokens"):
        ax[1].axhline(report["max_new_tokens"], color="gray", ls="--", lw=0.8,
                      label="token budget")
    ax[1].set(title="mean response length, held out", xlabel="iteration", ylabel="tokens")
    ax[1].legend(fontsize=8)
    if judged:
        for n in names:
            pts = [(r["iteration"], r["win_rate_vs_base"]["by_constitution"][n]) for r in judged
                   if n in r["win_rate_vs_base"]["by_constitution"]]
            ax[2].errorbar([p[0] for p in pts], [p[1]["win_rate"] for p in pts],
                           yerr=[p[1]["stderr"] for p in pts], marker="o", capsize=4, label=n)
        ax[2].axhline(0.5, color="gray", lw=0.5)
        bias = judged[-1]["win_rate_vs_base"].get("position_bias", float("nan"))
        ax[2].set(title=f"win rate vs base (judged; position bias {_num(bias, '.2f')})",
                  xlabel="iteration", ylim=(0, 1))
        ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xticks(it)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str, report: dict) -> str:
    """Writes <out>/report.md and <out>/report.png; returns the markdown."""
    text = markdown(report)
    atomic_write(os.path.join(out, "report.md"), text)
    plot(report, os.path.join(out, "report.png"))
    return text
