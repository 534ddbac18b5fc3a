"""SAMI: teach a model to follow constitutions by maximising a mutual-information bound.

    align-jax run --gin_file=configs/runs/sami_recipe_tiny.gin --output_dir=runs/sami

Iteration k (1..N), after the paper's Algorithm 1:
  1. sample: for each training query and C constitutions drawn from the pool, the model of
     iteration k-1 (the base model for k = 1) writes one response per constitution;
  2. train: starting again from the *base* model, take `steps_per_iteration * k` SAMI steps
     (one per batch of queries) on those responses; the result is the model of iteration k.
Queries alternate between two halves of the query set from one iteration to the next, so a
model never samples for the queries it was trained on. After every iteration, the bound
    I(y; c | x) >= mean_j [ log p(y_j | x, c_j) - log mean_i p(y_j | x, c_i) ]
is measured on held-out queries with responses sampled by that iteration's model.
"""

import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from align_jax import sharding
from align_jax.train.optim import OptimizerConfig

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    print(f"[sami] {msg}", flush=True)


def constitution_texts(path: str) -> list[str]:
    """Constitution records (DESIGN.md schema) as the numbered principle lists the model sees."""
    from align_jax.data.formatting import constitution_text
    from align_jax.data.sources import load_records
    records, _ = load_records(path, schema="constitution")
    return [constitution_text(r.data) for r in records]


def _draws(num_queries: int, num_constitutions: int, c: int, rng: random.Random):
    """C distinct constitutions per query."""
    if num_constitutions < c:
        raise ValueError(f"sami: {c} constitutions per query but only {num_constitutions} "
                         f"in the pool")
    return [rng.sample(range(num_constitutions), c) for _ in range(num_queries)]


def sample_responses(model_dir: str, queries: Sequence[str], constitutions: Sequence[str],
                     draws: Sequence[Sequence[int]], *, max_new_tokens: int,
                     temperature: float, top_p: float, seed: int) -> list[dict]:
    """SAMI records: each query with its C constitutions and one response sampled under each.

    The prompt of (constitution, query) is rendered exactly as training renders it, and the
    responses are kept as the sampler's token ids.
    """
    from align_jax.data.formatting import render_prompt
    from align_jax.generate import generate
    from align_jax.models.hf import load_hf
    from align_jax.models.named import resolve_model_path
    from align_jax.tokenizer import load_tokenizer
    config, params = load_hf(model_dir)
    tok = load_tokenizer(resolve_model_path(model_dir))
    prompts = [render_prompt(tok, f"{constitutions[i]}\n\n{q}").tolist()
               for q, draw in zip(queries, draws) for i in draw]
    out = generate(config, params, prompts, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, seed=seed, tokenizer=tok)
    c = len(draws[0])
    records = []
    for n, (q, draw) in enumerate(zip(queries, draws)):
        responses = [out.tokens[n * c + j] or [tok.eos_id] for j in range(c)]
        records.append({"prompt": q, "constitutions": [constitutions[i] for i in draw],
                        "responses": responses,
                        "texts": [out.texts[n * c + j] for j in range(c)]})
    return records


def mi_bound(model_dir: str, records: Sequence[dict], *, seq_len: int,
             batch_size: int = 8, mesh=None) -> dict[str, float]:
    """Mean InfoNCE bound and response length of SAMI records under a model (scored over
    `mesh` when given)."""
    from align_jax.data import batching
    from align_jax.data.formatting import format_records
    from align_jax.eval import mi_lower_bound_matrix
    from align_jax.losses import sami_logps
    from align_jax.losses.scorer import score_examples
    from align_jax.models.hf import load_hf
    from align_jax.models.named import resolve_model_path
    from align_jax.tokenizer import load_tokenizer
    config, params = load_hf(model_dir)
    tok = load_tokenizer(resolve_model_path(model_dir))
    examples, _, _ = format_records(records, kind="sami", tokenizer=tok, seq_len=seq_len,
                                    truncation="truncate_prompt_left", on_error="skip")
    logps = score_examples(lambda p, b: sami_logps(config, p, b)[0], params, examples,
                           build=batching.sami_batch, seq_len=seq_len, batch_size=batch_size,
                           pad_id=tok.pad_id or 0, mesh=mesh)
    bounds = [float(mi_lower_bound_matrix(m[None])) for m in logps]
    lengths = [len(r) for rec in records for r in rec["responses"]]
    return {"mi_bound": float(np.mean(bounds)), "queries": len(bounds),
            "mean_response_tokens": float(np.mean(lengths))}


def _write(path: str, rows: Sequence[dict]) -> str:
    from align_jax import distributed
    from align_jax.sdg.store import write_jsonl
    # Multi-process: process 0 writes (a shared run folder), the others wait, then all read.
    if distributed.is_main():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(path, rows)
    distributed.barrier(f"align_jax.write:{path}")
    return path


def sami(*, output_dir: str, init_from: str, constitutions: str, queries: str,
         num_iterations: int = 3, steps_per_iteration: int = 2, batch_size: int = 8,
         constitutions_per_query: int = 2, eval_queries: int = 8, max_new_tokens: int = 64,
         temperature: float = 1.0, top_p: float = 1.0, learning_rate: float = 5e-7,
         seq_len: int = 512, mesh: sharding.MeshSpec | None = None, rules: str = "fsdp",
         seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Runs SAMI and returns the report (also <output_dir>/report.json, report.md, report.png).

    Args:
      output_dir: run folder; iteration k lives in iter_k/ (data.jsonl, the train run, hf/).
      init_from: the base model (Hugging Face dir with tokenizer files).
      constitutions: constitution records (e.g. from `align-jax sdg` task "principles").
      queries: records with a `prompt` field (e.g. an SFT file; completions are ignored).
      num_iterations: N (the paper: 3).
      steps_per_iteration: N_b; iteration k takes N_b * k steps (the paper: 2, 4, 6).
      batch_size: queries per step (the paper: 128).
      constitutions_per_query: C (the paper: 2).
      eval_queries: held-out queries for the MI bound.
      max_new_tokens, temperature, top_p: response sampling.
      learning_rate: constant, AdamW (the paper: 5e-7).
      seq_len: rows of (constitution + query, response).
      mesh, rules, seed, progress: as for `align-jax train`.
    """
    from align_jax.data.sources import load_records
    from align_jax.train.entry import train_main

    out = os.path.abspath(output_dir)
    cons = constitution_texts(constitutions)
    prompts = [r.data["prompt"] for r in load_records(queries, schema="query")[0]]
    rng = random.Random(seed)
    rng.shuffle(prompts)
    held, pool = prompts[:eval_queries], prompts[eval_queries:]
    halves = [pool[0::2], pool[1::2]]
    if not held or not all(halves):
        raise ValueError(f"sami: {len(prompts)} queries in {queries} are too few for "
                         f"{eval_queries} held out and two training halves")
    c = constitutions_per_query
    held_draws = _draws(len(held), len(cons), c, rng)
    sample_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)

    def evaluate(name, model_dir, k):
        recs = sample_responses(model_dir, held, cons, held_draws, seed=seed + 1000 + k,
                                **sample_kw)
        _write(os.path.join(out, "eval", f"{name}.jsonl"), recs)
        row = mi_bound(model_dir, recs, seq_len=seq_len)
        _say(f"{name}: MI bound {row['mi_bound']:.4f} nats on {row['queries']} held-out "
             f"queries, mean response {row['mean_response_tokens']:.1f} tokens")
        return row

    report = {"iterations": [{"iteration": 0, "model": init_from,
                              **evaluate("iter_0", init_from, 0)}]}
    sampler = init_from
    for k in range(1, num_iterations + 1):
        steps = steps_per_iteration * k
        half = halves[(k - 1) % 2]
        qs = [half[i % len(half)] for i in range(steps * batch_size)]
        records = sample_responses(sampler, qs, cons, _draws(len(qs), len(cons), c, rng),
                                   seed=seed + k, **sample_kw)
        data = _write(os.path.join(out, f"iter_{k}", "data.jsonl"), records)
        _say(f"iteration {k}: sampled {len(records)} x {c} responses with {sampler}; "
             f"training the base model for {steps} steps")
        run_dir = os.path.join(out, f"iter_{k}", "train")
        train_main(output_dir=run_dir, data=data, objective="sami", init_from=init_from,
                   seq_len=seq_len, batch_size=batch_size, num_steps=steps,
                   optimizer=OptimizerConfig(learning_rate=learning_rate, schedule="constant"),
                   mesh=mesh, rules=rules, seed=seed, save_every=steps, log_every=1,
                   progress=progress)
        sampler = os.path.join(run_dir, "hf")
        report["iterations"].append({"iteration": k, "model": sampler, "steps": steps,
                                     **evaluate(f"iter_{k}", sampler, k)})
    from align_jax import distributed
    if distributed.is_main():
        from align_jax.atomic import atomic_write_json
        atomic_write_json(os.path.join(out, "report.json"), report)
        _report_files(out, report)
    return report


def _report_files(out: str, report: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["iterations"]
    lines = ["# SAMI report", "", "| iteration | steps | MI bound (nats) | mean response tokens |",
             "|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {r.get('steps', 0)} | {r['mi_bound']:.4f} | "
              f"{r['mean_response_tokens']:.1f} |" for r in rows]
    from align_jax.atomic import atomic_write
    atomic_write(os.path.join(out, "report.md"), "\n".join(lines) + "\n")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    it = [r["iteration"] for r in rows]
    ax[0].plot(it, [r["mi_bound"] for r in rows], marker="o")
    ax[0].set(title="conditional MI lower bound (held out)", xlabel="iteration", ylabel="nats")
    ax[1].plot(it, [r["mean_response_tokens"] for r in rows], marker="o")
    ax[1].set(title="mean response length", xlabel="iteration", ylabel="tokens")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "report.png"), dpi=110)
    plt.close(fig)
    print(open(os.path.join(out, "report.md")).read())
