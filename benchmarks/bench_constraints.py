"""Structured generation (issue 24): the cost of a constrained decode step, and of compiling a
constraint, on SmolLM2-135M-Instruct (49,152-token vocabulary).

Decode: batch 16 chat prompts, greedy; unconstrained, a typical SDG JSON schema and a choice
constraint, timed interleaved (one round runs all three) and reported as medians. A step's
cost is (t(M) - t(1)) / (steps - 1): t(M) a call with budget M, t(1) a call that only prefills
and draws the first token, steps the longest row's token count (constrained rows may finish
early; finished rows keep riding the batched forward pass, so every step costs the same work).
Compilation is excluded (a warm-up call of each shape first).

Compile: the schema for SmolLM2's tokenizer in a fresh state (tokenizer byte table included),
again with the tokenizer table already built, and the cached lookup.

    PYTHONPATH=. python benchmarks/bench_constraints.py [--rounds 5] [--budget 48]
"""

import argparse
import os
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "question": {"type": "string"},
    "answer": {"enum": ["yes", "no"]},
    "explanation": {"type": "string", "maxLength": 200}},
    "required": ["question", "answer", "explanation"], "additionalProperties": False}
CHOICES = ["yes", "no"]
QUESTIONS = ["Is honesty a value?", "Should gifts from suppliers be reported?",
             "Is it fair to hide mistakes?", "Do we treat everyone with respect?"]


def _compile_times(tokenizer):
    from align_jax.generate import constraints
    from align_jax.generate.constraints import automaton

    def fresh(keep_table: bool):
        automaton.byte_dfa.cache_clear()
        automaton._COMPILED.clear()
        if not keep_table:
            automaton._TABLES.clear()
        t = time.perf_counter()
        constraints.compile_constraint(constraints.json_schema(SCHEMA), tokenizer)
        return time.perf_counter() - t

    first = fresh(keep_table=False)
    schema_only = statistics.median(fresh(keep_table=True) for _ in range(3))
    t = time.perf_counter()
    constraints.compile_constraint(constraints.json_schema(SCHEMA), tokenizer)
    cached = time.perf_counter() - t
    return first, schema_only, cached


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)

    from align_jax.generate import constraints, generate
    from align_jax.models.hf import load_hf
    from align_jax.models.named import resolve_model_path
    from align_jax.tokenizer import encode_prompt, load_tokenizer

    path = resolve_model_path("smollm2-135m-instruct")
    config, params = load_hf(path)
    tok = load_tokenizer(path)
    first, schema_only, cached = _compile_times(tok)
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"compile SDG schema for a {tok.vocab_size}-token vocabulary: first {first:.2f} s "
          f"(tokenizer table included), tokenizer table cached {schema_only:.2f} s, "
          f"cached lookup {cached * 1e6:.0f} us")

    prompts = [encode_prompt(tok, QUESTIONS[i % len(QUESTIONS)]) for i in range(args.batch)]
    modes = {"unconstrained": None, "json schema": constraints.json_schema(SCHEMA),
             "choice": constraints.choice(CHOICES)}

    def call(c, budget):
        t = time.perf_counter()
        # The unconstrained rows ignore EOS so that the baseline runs the whole budget.
        out = generate(config, params, prompts, max_new_tokens=budget, tokenizer=tok,
                       constraint=c, batch_size=args.batch, shape_budget=args.budget,
                       ignore_eos=c is None)
        return time.perf_counter() - t, max(len(x) for x in out.tokens), out

    for c in modes.values():  # warm-up: compile every shape
        call(c, 1)
        call(c, args.budget)
    per_step = {name: [] for name in modes}
    outs, steps_of = {}, {}
    for _ in range(args.rounds):
        for name, c in modes.items():
            t1, _, _ = call(c, 1)
            tm, steps, outs[name] = call(c, args.budget)
            steps_of[name] = steps
            if steps > 1:
                per_step[name].append((tm - t1) / (steps - 1))
    base = statistics.median(per_step["unconstrained"])
    print(f"decode step, batch {args.batch}, budget {args.budget}, {args.rounds} rounds "
          f"(medians):")
    print("| mode | steps | ms / step | ratio | valid / complete rows |")
    print("|---|---|---|---|---|")
    for name, c in modes.items():
        ms = statistics.median(per_step[name]) if per_step[name] else float("nan")
        out = outs[name]
        ok = "-" if c is None else (
            f"{sum(c.validate(t) for t in out.texts)} / "
            f"{sum(not x for x in out.incomplete)} of {len(out.texts)}")
        print(f"| {name} | {steps_of[name]} | {ms * 1e3:.1f} | {ms / base:.3f} | {ok} |")


if __name__ == "__main__":
    main()
