"""The SmolLM2-135M-Instruct `local:` teacher on the example document (issue 8).

Records/s of the SDG instruct stage, wall time including compilation (what a user waits for),
each configuration in a fresh process:
  before:     per-call shapes (batch = the call's prompts rounded to a power of two, budget =
              the call's max_tokens): the question and answer calls compile their own
              prefill and decode; no persistent compilation cache;
  after:      one budget for every call (shape_budget 128, batches of at most 4 rows bucketed
              to powers of two, as `make demo`), no persistent cache;
  after+warm: the same in a second process with JAX's persistent compilation cache filled by
              the first (`align-jax` enables it under $ALIGN_JAX_CACHE/jax).
Every run uses `make demo`'s SDG settings (the small-teacher numbered-list question template,
3 questions per chunk, 128-token budgets). Then the decode step in float32 vs bfloat16 weights
(4 rows, 64 new tokens, compiled first), and a profile of one float32 decode step: the whole
step with 128, 512 and 2,048 cache slots (attention reads every allocated slot; the donated
cache is updated in place, one slot per layer), the same without the unembedding, and the
unembedding alone.

    python benchmarks/bench_teacher.py [--max_chunks 3]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENT = os.path.join(ROOT, "examples", "values_document.md")
NAME = "smollm2-135m-instruct"


def _sdg(out_dir, max_chunks, unified, cache_dir):
    import jax

    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    from align_jax.sdg.backends import make_teacher
    from align_jax.sdg.instruct import InstructConfig
    from align_jax.sdg.pipeline import run_document_sdg

    t0 = time.perf_counter()
    kw = {"batch_size": 4, "shape_budget": 128} if unified else {}
    teacher = make_teacher(f"local:{NAME}", max_len=1024, **kw)
    load = time.perf_counter() - t0
    t1 = time.perf_counter()
    summary = run_document_sdg([DOCUMENT], out_dir, teacher=teacher, tokenizer=teacher.tokenizer,
                               nex=3, chunk_tokens=256, overlap=32, max_chunks=max_chunks,
                               stages=("instruct",), concurrency=1, progress=False,
                               verbose=False,
                               templates={"instruct_questions": "instruct_questions_small"},
                               instruct_config=InstructConfig(
                                   question_max_tokens=128, answer_max_tokens=128))
    took = time.perf_counter() - t1
    from align_jax.generate import trace_counts
    records = summary["kinds"].get("sft", {}).get("raw", 0)
    return {"load_s": round(load, 1), "sdg_s": round(took, 1), "records": records,
            "records_per_s": round(records / took, 4), "traces": trace_counts()}


def _decode(dtype):
    import jax
    import jax.numpy as jnp

    from align_jax.generate import generate
    from align_jax.models import load_hf
    from align_jax.models.named import resolve_model_path
    from align_jax.tokenizer import load_tokenizer

    path = resolve_model_path(NAME)
    config, params = load_hf(path, dtype=jnp.dtype(dtype))
    tok = load_tokenizer(path)
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "Describe a bicycle repair shop."}],
        add_generation_prompt=True))
    prompts = [prompt] * 4

    def run(n):
        t = time.perf_counter()
        out = generate(config, params, prompts, max_new_tokens=n, tokenizer=tok, ignore_eos=True)
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - t

    run(64)  # compile
    short, long = min(run(8) for _ in range(2)), min(run(64) for _ in range(2))
    return {"dtype": dtype, "decode_step_s": round((long - short) / 56, 4),
            "prefill_plus_8_s": round(short, 3)}


def _profile():
    """One float32 decode step of 4 rows, split: the whole step at several cache lengths,
    the same step without the unembedding, and the unembedding alone (49,152 x 576)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from align_jax.models import load_hf, transformer
    from align_jax.models.named import resolve_model_path

    config, params = load_hf(resolve_model_path(NAME))
    decoder = transformer.Decoder(config)
    b = 4

    def step(params, cache, hidden_only):
        tok = jnp.ones((b, 1), jnp.int32)
        pos = jnp.full((b, 1), cache["segment_ids"].shape[1] - 1, jnp.int32)
        h, cache = decoder.apply({"params": params}, tok, pos, jnp.ones_like(tok), cache,
                                 method=transformer.Decoder.hidden)
        if hidden_only:
            return h, cache
        w = decoder.apply({"params": params}, method=transformer.Decoder.unembed_matrix)
        return jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=jnp.float32), cache

    def unembed(params, h):
        w = decoder.apply({"params": params}, method=transformer.Decoder.unembed_matrix)
        return jnp.einsum("BD,DV->BV", h, w, preferred_element_type=jnp.float32)

    def best_ms(fn, *a, n=20):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(n):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - t)
        return round(1e3 * float(np.median(times)), 2)

    def step_ms(fn, cache, n=20):
        # The cache is donated and carried, as in the decode loop (updated in place).
        out, cache = fn(params, cache)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            out, cache = fn(params, cache)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t)
        return round(1e3 * float(np.median(times)), 2)

    row = {}
    for s in (128, 512, 2048):
        for hidden_only in (False, True):
            cache = transformer.init_cache(config, b, s)
            cache["index"] = jnp.int32(s - 1)  # the step writes the last slot; reads all
            fn = jax.jit(functools.partial(step, hidden_only=hidden_only), donate_argnums=1)
            key = f"{'hidden_only' if hidden_only else 'step'}_cache{s}_ms"
            row[key] = step_ms(fn, cache)
    row["unembed_only_ms"] = best_ms(jax.jit(unembed), params, jnp.ones((b, config.embed_dim)))
    return row


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--max_chunks", type=int, default=3)
    p.add_argument("--child", nargs="*", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "sdg":
            out_dir, unified, cache = rest
            row = _sdg(out_dir, args.max_chunks, unified == "1", cache or None)
        elif kind == "profile":
            row = _profile()
        else:
            row = _decode(rest[0])
        print(json.dumps(row))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "jax-cache")
        runs = [("before", ["sdg", os.path.join(tmp, "a"), "0", ""]),
                ("after", ["sdg", os.path.join(tmp, "b"), "1", cache]),
                ("after+warm", ["sdg", os.path.join(tmp, "c"), "1", cache]),
                ("decode float32", ["decode", "float32"]),
                ("decode bfloat16", ["decode", "bfloat16"]),
                ("decode step profile, float32, 4 rows", ["profile"])]
        for label, child in runs:
            out = subprocess.run([sys.executable, __file__, "--max_chunks", str(args.max_chunks),
                                  "--child", *child], cwd=ROOT, capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONPATH": ROOT})
            row = {"what": label, **json.loads(out.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            rows.append(row)
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "teacher.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
