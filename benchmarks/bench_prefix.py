"""Shared-prefix prefill: few-shot prompts with one long common prefix, sharing off vs on.

SmolLM2-135M-Instruct (float32), 64 few-shot prompts of ~180 tokens: one ~130-token prefix
(instructions and two worked examples, as an SDG template) and a ~50-token passage of its
own each; 16 new tokens, greedy, EOS ignored so both sides generate every token. Default
batching (2 batches of 32). `share_prefix=False` vs `share_prefix=True`, each compiled by a
warm-up call, then timed interleaved (the order alternates each round) and reported as
medians; the tokens of both must be identical. The load average is printed before and after.

    PYTHONPATH=. python benchmarks/bench_prefix.py [--rounds 3] [--prompts 64]
"""

import argparse
import os
import statistics
import time

import numpy as np

PREFIX = (
    "You write one question about a passage from a company's code of conduct, and its answer "
    "in one sentence, using only what the passage says. Write the question after 'Question:' "
    "and the answer after 'Answer:'.\n\n"
    "Passage: Employees report gifts from suppliers worth more than fifty euros to their "
    "manager within a week.\nQuestion: When must a gift from a supplier be reported?\nAnswer: "
    "When it is worth more than fifty euros, within a week.\n\n"
    "Passage: We treat every colleague with respect, whatever their role.\nQuestion: Whom do "
    "we treat with respect?\nAnswer: Every colleague, whatever their role.\n\n")
CLAUSES = [
    "Managers listen to concerns raised in good faith and never punish the person who raised "
    "them", "customer data is stored only as long as the contract requires",
    "mistakes are reported early so that they can be fixed before they harm anyone",
    "we compete fairly and do not discuss prices with competitors",
    "safety instructions on every site are followed even when a deadline is close",
    "conflicts of interest are declared to the ethics office before a decision is taken",
    "everyone may ask for help when a rule is unclear", "public statements are made only by "
    "the press office", "records are kept accurate and complete",
    "we do not accept bribes or offer them, directly or through others"]


def _prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        picks = rng.choice(len(CLAUSES), size=int(rng.integers(2, 4)), replace=False)
        passage = "; ".join(CLAUSES[i] for i in picks)
        out.append(tok.encode(f"{PREFIX}Passage: {passage[0].upper()}{passage[1:]}.\nQuestion:",
                              add_bos=True))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    from align_jax.generate import generate, prefix, prompt_batches
    from align_jax.models.hf import load_hf
    from align_jax.models.named import resolve_model_path
    from align_jax.tokenizer import load_tokenizer

    path = resolve_model_path("smollm2-135m-instruct")
    config, params = load_hf(path)
    tok = load_tokenizer(path)
    prompts = _prompts(tok, args.prompts)
    lengths = [len(p) for p in prompts]
    common = prefix.common_prefix_len(prompts)
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens (mean "
          f"{np.mean(lengths):.0f}), common prefix {common} tokens, {args.new_tokens} new, "
          f"greedy")

    def call(share):
        t = time.perf_counter()
        out = generate(config, params, prompts, max_new_tokens=args.new_tokens,
                       ignore_eos=True, share_prefix=share)
        return time.perf_counter() - t, out

    load_before = os.getloadavg()
    warm = {share: call(share) for share in (False, True)}  # compiles each shape
    assert warm[True][1].tokens == warm[False][1].tokens, "sharing changed the tokens"
    times = {False: [], True: []}
    for r in range(args.rounds):
        for share in ((False, True) if r % 2 == 0 else (True, False)):
            t, out = call(share)
            assert out.tokens == warm[False][1].tokens
            times[share].append(t)
    load_after = os.getloadavg()
    # Prefill tokens computed per batch: B x T unshared; P once + B x T_s shared.
    batches = prompt_batches.plan_batches(prompts, batch_size=32,
                                          cap=config.max_position - args.new_tokens)
    plain_tokens = sum(b.tokens_BT.size for b in batches)
    shared = [prefix.share(b, prompts, config=config, mode=None,
                           cap=config.max_position - args.new_tokens, pad_id=0)
              for b in batches]
    shared_tokens = sum(b.prefix_1T.shape[1] + b.tokens_BT[:, b.prefix_1T.shape[1]:].size
                        if b.prefix_1T is not None else b.tokens_BT.size for b in shared)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
          f"({os.cpu_count()} CPUs)")
    print("| share_prefix | prefill tokens computed | wall s (median of "
          f"{args.rounds}) | runs s |")
    print("|---|---|---|---|")
    print(f"| False | {plain_tokens} | {off:.2f} | "
          f"{', '.join(f'{t:.2f}' for t in times[False])} |")
    print(f"| True | {shared_tokens} | {on:.2f} | "
          f"{', '.join(f'{t:.2f}' for t in times[True])} |")
    print(f"speedup off/on: {off / on:.2f}x; identical tokens: yes; shared prefix tokens per "
          f"prompt: {sorted(set(warm[True][1].shared_prefix_tokens))}")


if __name__ == "__main__":
    main()
