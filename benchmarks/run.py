"""`make bench`: every benchmark section, side by side, results in benchmarks/results/*.json.

Copy the printed tables into benchmarks/RESULTS.md with the hardware line and the date.
"""

import importlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

SECTIONS = ["bench_model", "bench_train", "bench_generate", "bench_sdg", "bench_lora", "bench_eval",
            "bench_constraints", "bench_moe", "bench_prefix", "bench_decode_budget"]


def main():
    only = sys.argv[1:]
    for name in SECTIONS:
        if only and name not in only:
            continue
        print(f"\n## {name}")
        importlib.import_module(f"benchmarks.{name}").main([])


if __name__ == "__main__":
    main()
