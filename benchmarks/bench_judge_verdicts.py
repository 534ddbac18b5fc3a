"""A small local judge's verdicts with and without a constraint (issue 24): how many are
readable, how many ran out of tokens first, how long the judging took.

SmolLM2-135M-Instruct (or --judge) as a `local:` judge of the first N held-out preference
pairs of examples/preference_heldout.jsonl, both orders (chosen in slot A, then in slot B),
greedy, at the template's budget, under each answer form:
  free     no constraint (the tolerant parser reads whatever it writes);
  open     the template's whole answer with free feedback, `VERDICT_REGEX` ([\\s\\S]* before
           the verdict);
  line     one unbounded line of feedback, then the verdict;
  bounded  one line of at most budget - len(verdict) characters, then the verdict
           (`eval.judge.verdict_pattern`: what the judges use).
"right" counts verdicts for the chosen (the code's) answer; position bias is the share of
pairs whose two orders chose the same slot.

    PYTHONPATH=. python benchmarks/bench_judge_verdicts.py [--pairs 4] \
        [--templates relative constitution] [--modes free open line bounded]
"""

import argparse
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRINCIPLES = "1. Follow the cooperative's code of conduct.\n2. Be honest and safe."
RUBRIC = "Which response follows the code of conduct?"


def patterns(template: str, max_tokens: int) -> dict:
    from align_jax.eval.judge import VERDICT_REGEX, verdict_pattern
    line = {"constitution": r"Comparison: [^\n]*\nFinal Response: [AB]",
            "constitution_summary": r"Comparison: [^\n]*\nFinal Response: [AB]"}.get(
        template, r"[^\n]*\n?\[RESULT\] [AB]")
    return {"free": None, "open": VERDICT_REGEX[template], "line": line,
            "bounded": verdict_pattern(template, max_tokens=max_tokens)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--templates", nargs="+", default=["relative", "constitution"])
    ap.add_argument("--modes", nargs="+", default=["free", "open", "line", "bounded"])
    args = ap.parse_args(argv)

    import numpy as np

    from align_jax.eval.judge import (
        ask_judge,
        judge_sampling,
        judge_system_prompt,
        load_judge_template,
        parse_verdict,
    )
    from align_jax.generate import constraints
    from align_jax.sdg.backends import LocalTeacher

    with open(os.path.join(ROOT, "examples", "preference_heldout.jsonl")) as f:
        pairs = [json.loads(x) for x in f][:args.pairs]
    judge = LocalTeacher(args.judge, max_len=1024, batch_size=16)
    for name in args.templates:
        tpl = load_judge_template(name)
        sampling = judge_sampling(tpl)
        prompts, want = [], []
        for r in pairs:
            for a, b, letter in ((r["chosen"], r["rejected"], "A"),
                                 (r["rejected"], r["chosen"], "B")):
                prompts.append(tpl.render(instruction=r["prompt"], response_a=a, response_b=b,
                                          reference="(none given)", rubric=RUBRIC,
                                          principles=PRINCIPLES))
                want.append(letter)
        for mode in args.modes:
            pattern = patterns(name, sampling["max_tokens"])[mode]
            t = time.perf_counter()
            texts = ask_judge(judge, prompts, system=judge_system_prompt(tpl), seed=0,
                              constraint=None if pattern is None else constraints.regex(pattern),
                              **sampling)
            seconds = time.perf_counter() - t
            cut = judge.last_incomplete
            verdicts = [parse_verdict(x) for x in texts]
            both = [(verdicts[i], verdicts[i + 1]) for i in range(0, len(verdicts), 2)
                    if verdicts[i] and verdicts[i + 1]]
            print(json.dumps({
                "template": name, "mode": mode, "pattern": pattern,
                "judgements": len(texts), "readable": sum(v is not None for v in verdicts),
                "ran_out": None if cut is None else int(sum(cut)),
                "right": sum(v == w for v, w in zip(verdicts, want)),
                "verdicts": "".join(v or "-" for v in verdicts),
                "position_bias": float(np.mean([a == b for a, b in both])) if both else None,
                "mean_chars": float(np.mean([len(x) for x in texts])),
                "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
