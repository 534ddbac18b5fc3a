"""The plots of benchmarks/RESULTS.md, drawn from the JSON the benchmark sections write.

Each plot reads `results/<section>.json` (this machine's latest run of that section) and, for
a section not run here, `archive/<section>.json`: numbers measured earlier, copied from the
dated tables of LOG.md with their date and machine. The title says which, and when.

    python benchmarks/plots.py [--results DIR] [--archive DIR] [--out DIR]

Writes one PNG per plot whose data exists and prints what it wrote and what it skipped.
"""

import argparse
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent


def load_section(name: str, dirs: list[pathlib.Path]) -> dict | None:
    """The payload of the first `<dir>/<name>.json` found, with "origin" set to its folder
    name (results: this run; archive: copied from older tables), or None."""
    for d in dirs:
        path = d / f"{name}.json"
        if path.exists():
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(payload.get("rows"), list):
                raise ValueError(f"{path}: field 'rows' (a list) is missing")
            return {**payload, "origin": d.name}
    return None


def _title(fig, text: str, payload: dict) -> None:
    tag = "archived" if payload["origin"] == "archive" else "measured"
    fig.suptitle(f"{text}\n{tag} {payload.get('date', '?')}, {payload.get('hardware', '?')}",
                 fontsize=7)


def _batch(row: dict) -> int | None:
    if "batch" in row:
        return int(row["batch"])
    m = re.search(r"\bB=(\d+)", str(row.get("what", "")))
    return int(m.group(1)) if m else None


def plot_decode(payload: dict, fig) -> bool:
    """Seconds of a whole greedy call vs the cache slots it was compiled for, per attention."""
    ax = fig.add_subplot()
    rows = [r for r in payload["rows"] if "cache slots" in r]
    for attention in dict.fromkeys(r["attention"] for r in rows):
        pts = sorted((r["cache slots"], r["seconds"]) for r in rows if r["attention"] == attention)
        ax.plot(*zip(*pts), marker="o", label=attention)
    ax.set_xlabel("KV cache slots allocated")
    ax.set_ylabel("seconds per call (same work)")
    ax.set_ylim(bottom=0)
    return bool(rows)


def plot_tokens(payload: dict, fig) -> bool:
    """New tokens/s vs batch, align_jax and transformers (whole call, prefill included)."""
    ax = fig.add_subplot()
    rows = sorted((r for r in payload["rows"] if "align_jax tok/s" in r and _batch(r)),
                  key=_batch)
    peer = "torch tok/s" if rows and "torch tok/s" in rows[0] else "transformers tok/s"
    for key, label in (("align_jax tok/s", "align_jax"), (peer, "transformers")):
        pts = [(_batch(r), r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("new tokens / s")
    return bool(rows)


def plot_lora(payload: dict, fig) -> bool:
    """Step memory, full fine-tuning vs LoRA: measured small-model steps (MB) on the left,
    compiled 1B-class DPO steps from shapes (GB per device) on the right."""
    small = [(r["what"].split(" (")[0], r["full step MB"], r["LoRA step MB"])
             for r in payload["rows"] if "full step MB" in r]
    full_ft = [r["compiled step GB / device"] for r in payload["rows"]
               if r.get("vs full FT") == 1]
    big = [(_lora_label(r["what"]), full_ft[0], r["compiled step GB / device"])
           for r in payload["rows"] if full_ft and r.get("vs full FT", 1) != 1
           and "llama3_1b" in r["what"]]
    panels = [(bars, unit) for bars, unit in ((small, "MB"), (big, "GB / device")) if bars]
    for i, (bars, unit) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        xs = range(len(bars))
        ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], width=0.4, label="full fine-tuning")
        ax.bar([x + 0.2 for x in xs], [b[2] for b in bars], width=0.4, label="LoRA")
        ax.set_xticks(list(xs), [b[0] for b in bars], rotation=15, ha="right", fontsize=6)
        ax.set_ylabel(f"step memory, {unit}", fontsize=7)
    return bool(panels)


def _lora_label(what: str) -> str:
    model = what.split()[1]
    m = re.search(r"(bf16 base, \w+ compute|f32 base)", what)
    return f"{model} LoRA, {m.group(1) if m else ''}"


def plot_eval(payload: dict, fig) -> bool:
    """CPU ms per question of each component of the (last) steady `evaluate_models` run."""
    ax = fig.add_subplot()
    keys = [k for r in payload["rows"] for k in r if k.startswith("component (")]
    if not keys:
        return False
    key = keys[-1]
    rows = sorted(((r[key], r["CPU ms per question"]) for r in payload["rows"]
                   if key in r and r["CPU ms per question"] > 0), key=lambda x: x[1])
    ax.barh([n for n, _ in rows], [ms for _, ms in rows])
    ax.set_xscale("log")
    ax.set_xlabel(f"CPU ms per question (log), {key}", fontsize=7)
    ax.tick_params(axis="y", labelsize=6)
    return bool(rows)


# (file name, section, plot function, title)
PLOTS = [
    ("decode_vs_cache.png", "decode_budget", plot_decode,
     "SmolLM2-135M greedy call vs cache slots (4 prompts, 48 new tokens)"),
    ("tokens_vs_batch_smollm2.png", "smollm2", plot_tokens,
     "SmolLM2-135M-Instruct generation, 1 thread a side"),
    ("tokens_vs_batch_tiny.png", "generate", plot_tokens,
     "4.2M random Llama-style model generation"),
    ("lora_memory.png", "bench_lora", plot_lora, "LoRA vs full fine-tuning: step memory"),
    ("eval_breakdown.png", "eval", plot_eval, "evaluate_models: where the time goes"),
]


def make_plots(results: pathlib.Path, archive: pathlib.Path, out: pathlib.Path) -> list[str]:
    """Draws every plot whose section has data; returns the PNG paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, section, fn, title in PLOTS:
        payload = load_section(section, [results, archive])
        if payload is None:
            print(f"skipped {filename}: no {section}.json in {results} or {archive}")
            continue
        fig = plt.figure(figsize=(6, 3.4), dpi=80)
        if fn(payload, fig):
            _title(fig, title, payload)
            for ax in fig.axes:
                ax.grid(alpha=0.3)
            if fig.axes[0].get_legend_handles_labels()[0]:
                fig.axes[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / filename)
            written.append(str(out / filename))
            print(f"wrote {out / filename} ({payload['origin']} {section}.json)")
        else:
            print(f"skipped {filename}: {section}.json has no rows this plot uses")
        plt.close(fig)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    ap.add_argument("--archive", type=pathlib.Path, default=HERE / "archive")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "plots")
    args = ap.parse_args(argv)
    make_plots(args.results, args.archive, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
