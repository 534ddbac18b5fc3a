"""Decode cost vs the compiled token budget (issue 28 item 1), on SmolLM2-135M-Instruct.

The same generation (4 chat prompts of ~40 tokens, 48 new tokens, greedy, EOS ignored so every
call does the same work) compiled for `shape_budget` 256 and 2048, as the server and the local
teacher share shapes: the cache then has prompt + 255 or prompt + 2047 slots. Cached attention
now reads only the filled slots (`blockwise.attend_filled`); `attention="xla"` is the reference
that attends over every allocated slot (the behaviour before), run alongside for comparison.

Both budgets (and both attentions) run in one process, alternating, one round each; after a
warm-up call of each (compilation excluded). Reported: the median seconds of each, and the
median over rounds of the per-round ratio t(2048) / t(256), with the load average before and
after (on a shared machine only the ratio is meaningful). Writes results/decode_budget.json
(the cache slots of each budget: longest prompt + budget - 1), which benchmarks/plots.py draws.

    PYTHONPATH=. python benchmarks/bench_decode_budget.py [--rounds 5] [--new 48]
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

QUESTIONS = ["Is honesty a value that matters at work?",
             "Should gifts from suppliers be reported to a manager?",
             "Is it fair to hide a small mistake from a customer?",
             "Do we treat everyone with respect, whatever their role?"]
BUDGETS = (256, 2048)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--no_reference", action="store_true",
                    help="skip the full-allocation reference (attention='xla')")
    args = ap.parse_args(argv)

    from align_jax.generate import generate
    from align_jax.models.hf import load_hf
    from align_jax.models.named import resolve_model_path
    from align_jax.tokenizer import encode_prompt, load_tokenizer
    from benchmarks import common

    path = resolve_model_path("smollm2-135m-instruct")
    config, params = load_hf(path)
    tok = load_tokenizer(path)
    prompts = [encode_prompt(tok, q) for q in QUESTIONS]
    modes = {"filled": config}
    if not args.no_reference:
        modes["all slots (xla)"] = dataclasses.replace(config, attention="xla")

    def call(cfg, budget):
        t = time.perf_counter()
        out = generate(cfg, params, prompts, max_new_tokens=args.new, temperature=0.0,
                       ignore_eos=True, batch_size=len(prompts), shape_budget=budget)
        dt = time.perf_counter() - t
        assert all(len(x) == args.new for x in out.tokens), "a row stopped early"
        return dt, out.tokens

    load0 = os.getloadavg()
    tokens = {}
    for name, cfg in modes.items():
        for budget in BUDGETS:
            _, tokens[name, budget] = call(cfg, budget)  # compile
    same = all(v == tokens["filled", BUDGETS[0]] for v in tokens.values())
    times = {key: [] for key in tokens}
    for _ in range(args.rounds):
        for key in times:
            times[key].append(call(modes[key[0]], key[1])[0])
    load1 = os.getloadavg()

    print(f"prompt lengths {[len(p) for p in prompts]}, {args.new} new tokens, greedy, "
          f"batch {len(prompts)}, {config.dtype}, {args.rounds} rounds")
    print(f"load average (1/5/15 min) before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, "
          f"after {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} on {os.cpu_count()} CPUs")
    print(f"same tokens at every budget and attention: {same}")
    print("| attention | " + " | ".join(f"budget {b} s" for b in BUDGETS)
          + f" | ratio {BUDGETS[1]}/{BUDGETS[0]} (median of rounds) | per-round ratios |")
    print("|---|" + "---|" * (len(BUDGETS) + 2))
    for name in modes:
        lo, hi = times[name, BUDGETS[0]], times[name, BUDGETS[1]]
        ratios = [b / a for a, b in zip(lo, hi)]
        print(f"| {name} | {statistics.median(lo):.2f} | {statistics.median(hi):.2f} | "
              f"{statistics.median(ratios):.2f} | "
              + ", ".join(f"{r:.2f}" for r in ratios) + " |")
    slots = max(len(p) for p in prompts) - 1
    common.save("decode_budget", [
        {"attention": name, "budget": budget, "cache slots": slots + budget,
         "seconds": statistics.median(times[name, budget]), "rounds": args.rounds,
         "same tokens": same} for name in modes for budget in BUDGETS],
        note=f"load average {load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
