"""Serving: continuous batching (`row_batcher.RowBatcher`) vs the batch window
(`serving.Batcher`), side by side on SmolLM2-135M-Instruct (issue 28 item 2).

Both batchers get the same jobs through their own worker threads (no HTTP), greedy, with EOS
biased away (logit_bias -100) so every row runs its whole max_tokens in both.

(a) latency: a 4-token request sent while a 256-token request runs (seconds from its submit
    to its answer).
(b) throughput: `--requests` jobs submitted at once, prompts of 16..512 tokens and 8..256 new
    tokens (seeded), generated tokens per second over the whole set.

Each batcher first runs the whole workload once untimed (the window batcher compiles every
shape it meets then; the rows compile at warm-up), then the timed runs alternate. The load
average is printed with the numbers: on a shared machine only the ratios of one run mean
anything.

    PYTHONPATH=. python benchmarks/bench_serving.py [--requests 32] [--rows 16]
"""

import argparse
import os
import sys
import threading
import time

SETTINGS = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0)


def _job(serving, prompt, max_tokens, no_eos, done, key):
    def deliver(rows):
        done[key] = (time.perf_counter(), rows)

    return serving.Job(prompts=[prompt], max_tokens=max_tokens, sampling=dict(SETTINGS),
                       seeds=[0], stop=(), logit_bias=no_eos, deliver=deliver)


def _wait(done, keys, timeout=3600):
    end = time.perf_counter() + timeout
    while not all(k in done for k in keys):
        if time.perf_counter() > end:
            raise TimeoutError(f"jobs {[k for k in keys if k not in done]} never finished")
        time.sleep(0.005)
    for k in keys:
        if isinstance(done[k][1], BaseException):
            raise done[k][1]


def latency(serving, batcher, prompts, no_eos) -> float:
    """Seconds a 4-token request takes while a 256-token one runs."""
    done = {}
    batcher.submit(_job(serving, prompts["long"], 256, no_eos, done, "long"))
    time.sleep(1.0)  # the long request is decoding
    t0 = time.perf_counter()
    batcher.submit(_job(serving, prompts["short"], 4, no_eos, done, "short"))
    _wait(done, ["short", "long"])
    return done["short"][0] - t0


def throughput(serving, batcher, workload, no_eos):
    """(tokens per second, tokens of each job) over the whole workload submitted at once."""
    done = {}
    t0 = time.perf_counter()
    for i, (prompt, m) in enumerate(workload):
        batcher.submit(_job(serving, prompt, m, no_eos, done, i))
    _wait(done, list(range(len(workload))))
    dt = max(done[i][0] for i in done) - t0
    tokens = [done[i][1][0].tokens for i in range(len(workload))]
    return sum(map(len, tokens)) / dt, tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max_prompt", type=int, default=512)
    ap.add_argument("--max_new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)

    import numpy as np

    from align_jax.generate import serving
    from align_jax.generate.row_batcher import RowBatcher
    from align_jax.models.hf import load_hf
    from align_jax.models.named import resolve_model_path
    from align_jax.tokenizer import load_tokenizer

    path = resolve_model_path("smollm2-135m-instruct")
    config, params = load_hf(path)
    tok = load_tokenizer(path)
    eos = {int(t) for t in (getattr(tok, "eos_ids", None) or ())}
    eos |= {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(
        config.eos_token_id or ())
    no_eos = {t: -100.0 for t in eos}
    rng = np.random.default_rng(0)

    def ids(n):
        return [int(x) for x in rng.integers(100, 40000, size=n)]

    prompts = {"long": ids(64), "short": ids(16)}
    workload = [(ids(int(rng.integers(16, args.max_prompt + 1))),
                 int(rng.integers(8, args.max_new + 1))) for _ in range(args.requests)]
    max_len = max(args.max_prompt, 64) + max(args.max_new, 256)  # (a) runs 64 + 256
    window = serving.Batcher(config, params, tok, max_len=max_len, max_batch_size=args.rows)
    rows = RowBatcher(config, params, tok, max_len=max_len, max_batch_size=args.rows,
                      warm_prompt=max(args.max_prompt, 64))
    t = time.perf_counter()
    rows.start()
    rows.ready.wait()
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    latency(serving, window, prompts, no_eos)  # compiles the window batcher's shapes
    throughput(serving, window, workload, no_eos)
    window_warm_s = time.perf_counter() - t
    latency(serving, rows, prompts, no_eos)
    throughput(serving, rows, workload, no_eos)

    load0 = os.getloadavg()
    res = {"window": {"lat": [], "tps": []}, "rows": {"lat": [], "tps": []}}
    toks = {}
    for _ in range(args.rounds):
        for name, b in (("window", window), ("rows", rows)):
            res[name]["lat"].append(latency(serving, b, prompts, no_eos))
            tps, toks[name] = throughput(serving, b, workload, no_eos)
            res[name]["tps"].append(tps)
    load1 = os.getloadavg()
    window.stop()
    rows.stop()
    same = sum(a == b for a, b in zip(toks["window"], toks["rows"]))
    print(f"SmolLM2-135M-Instruct, {config.dtype}, rows/max_batch_size {args.rows}, max_len "
          f"{max_len}; {args.requests} requests, prompts 16..{args.max_prompt}, new "
          f"8..{args.max_new} ({sum(m for _, m in workload)} tokens), greedy, {args.rounds} "
          f"round(s); {threading.active_count()} threads")
    print(f"load average (1/5/15 min) before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, "
          f"after {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} on {os.cpu_count()} CPUs")
    print(f"compile: rows warm-up {warm_s:.0f} s; window batcher's first workload run "
          f"{window_warm_s:.0f} s (compiles + runs)")
    print(f"same tokens (window vs rows): {same}/{args.requests} requests")
    print("| batcher | (a) 4-token latency s | (b) tokens/s |")
    print("|---|---|---|")
    for name in res:
        print(f"| {name} | " + ", ".join(f"{x:.2f}" for x in res[name]["lat"]) + " | "
              + ", ".join(f"{x:.1f}" for x in res[name]["tps"]) + " |")
    lat = [a / b for a, b in zip(res["window"]["lat"], res["rows"]["lat"])]
    tps = [b / a for a, b in zip(res["window"]["tps"], res["rows"]["tps"])]
    print("ratios per round: latency window/rows " + ", ".join(f"{x:.1f}" for x in lat)
          + "; throughput rows/window " + ", ".join(f"{x:.2f}" for x in tps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
