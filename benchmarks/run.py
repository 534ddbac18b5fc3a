"""`make bench`: every benchmark section, side by side, results in benchmarks/results/*.json.

Then benchmarks/plots.py draws benchmarks/plots/*.png from those files (and, for sections not
run, from benchmarks/archive/). Copy the printed tables into benchmarks/LOG.md under a dated
heading with the machine and its load, and the headline numbers into the summary table at
the top of benchmarks/RESULTS.md.
"""

import importlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

SECTIONS = ["bench_model", "bench_train", "bench_generate", "bench_sdg", "bench_lora", "bench_eval",
            "bench_constraints", "bench_moe", "bench_prefix", "bench_decode_budget",
            "bench_smollm2"]


def main():
    only = sys.argv[1:]
    for name in SECTIONS:
        if only and name not in only:
            continue
        print(f"\n## {name}")
        importlib.import_module(f"benchmarks.{name}").main([])
    from benchmarks import plots
    plots.main([])


if __name__ == "__main__":
    main()
