"""SAMI: teach a model to follow constitutions by maximising a mutual-information bound.

    align-jax run --gin_file=configs/runs/sami_demo.gin --output_dir=runs/sami_demo

Iteration k (1..N), after the paper's Algorithm 1 (Fränken et al. 2024):
  1. sample: for each training query and C constitutions drawn from the pool, the model of
     iteration k-1 (the base model for k = 1) writes one response per constitution, greedily
     by default (temperature 0, 350 tokens, the prompt format's stop strings); a query is kept
     only when all its responses pass the filters (methods/sami_prompts.py);
  2. train: starting from the base model (`init='base'`, the paper's algorithm box) or from
     the model of iteration k-1 (`init='latest'`, the reference code), with a fresh optimizer,
     take `steps_per_iteration * k` SAMI steps (one per batch of queries).
Queries alternate between two halves of the query set from one iteration to the next, so a
model never samples for the queries it was trained on. Prompts follow the paper's plain-text
format (base models) or the chat template (instruct models), with each constitution's
principles shuffled per prompt by a seeded generator.

After every iteration, on held-out queries with responses sampled by that iteration's model
under each of the C constitutions, the report gives
    mi_bound             mean over queries and targets j of the InfoNCE bound
                         log p(y_j|x,c_j) - log (1/C) sum_i p(y_j|x,c_i), with log p SUMMED over
                         response tokens (a lower bound on I(y; c | x), at most log C), and its
                         standard error over queries;
    mi_bound_token_mean  the same with log p averaged over response tokens, the quantity the
                         training loss (the paper's) works with: not a bound on I(y; c | x);
the mean response length under each constitution (with the share cut at `max_new_tokens`),
and, with a `judge`, win rates against the base model's held-out responses per constitution
(align_jax.eval.judge.pairwise_win_rate, both orders, length-controlled) with the judge's
position bias. Each iteration also records the wall and CPU seconds of its phases: train (make
model k), sample (model k's held-out responses together with the training data of iteration
k+1, one generation call), mi (the bound) and judge.
"""

import contextlib
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import distributed, sharding
from align_jax.atomic import atomic_write_json
from align_jax.data import batching
from align_jax.data.formatting import format_records, render_prompt
from align_jax.data.sources import load_records
from align_jax.eval import mi_lower_bound
from align_jax.eval.judge import pairwise_win_rate
from align_jax.eval.letter_judge import LetterJudge
from align_jax.generate import generate
from align_jax.losses import logprobs
from align_jax.losses.scorer import bind, score_examples
from align_jax.methods import sami_prompts, sami_report
from align_jax.models.hf import load_hf
from align_jax.models.named import resolve_model_path
from align_jax.sdg.backends import make_teacher
from align_jax.sdg.store import write_jsonl
from align_jax.tokenizer import load_tokenizer
from align_jax.train.entry import train_main
from align_jax.train.optim import OptimizerConfig

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    print(f"[sami] {msg}", flush=True)


def load_constitutions(path: str) -> list[list[str]]:
    """The principle lists of constitution records (DESIGN.md schema)."""
    records, _ = load_records(path, schema="constitution")
    return [list(r.data["principles"]) for r in records]


def constitution_names(path: str) -> list[str]:
    """The `id` of each constitution record (its file position when it has none)."""
    records, _ = load_records(path, schema="constitution")
    return [str(r.data.get("id", i)) for i, r in enumerate(records)]


def constitution_texts(path: str) -> list[str]:
    """Constitution records as the numbered principle lists (in their file order)."""
    return [sami_prompts.numbered(p) for p in load_constitutions(path)]


def _draws(num_queries: int, num_constitutions: int, c: int, rng: random.Random):
    """C distinct constitutions per query."""
    if num_constitutions < c:
        raise ValueError(f"sami: {c} constitutions per query but only {num_constitutions} "
                         f"in the pool")
    return [rng.sample(range(num_constitutions), c) for _ in range(num_queries)]


def make_prompts(queries: Sequence[str], constitutions: Sequence[Sequence[str]],
                 draws: Sequence[Sequence[int]], *, prompt_format: str, rng: random.Random,
                 example_format: bool = False) -> list[dict]:
    """Per query: the drawn constitutions (principles shuffled per prompt, independently per
    constitution) as numbered texts, the prompts that training and scoring use and the prompts
    the sampler sees (the same, plus the paper's example block when `example_format`)."""
    rows = []
    for q, draw in zip(queries, draws):
        orders = [sami_prompts.shuffled_principles(constitutions[i], rng) for i in draw]
        rows.append({
            "prompt": q, "constitution_ids": list(draw),
            "constitutions": [sami_prompts.numbered(o) for o in orders],
            "prompts": [sami_prompts.sami_prompt(o, q, fmt=prompt_format, rng=None)
                        for o in orders],
            "sample_prompts": [sami_prompts.sami_prompt(o, q, fmt=prompt_format, rng=None,
                                                        example_format=example_format)
                               for o in orders]})
    return rows


def sample_responses(model_dir: str, rows: Sequence[dict], *, max_new_tokens: int = 350,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     stop_strings: Sequence[str] = (), mesh=None,
                     rules: str = "fsdp") -> list[dict]:
    """SAMI records: each row of `make_prompts` with one response per constitution.

    A response that ended (EOS or a stop string) is kept as text (cut before any stop
    string) and re-encoded with EOS for training and scoring, so a stop string never becomes
    part of a trained response. A response cut at `max_new_tokens` is kept as the sampled
    token ids, without EOS: a truncated response is not taught (or scored) as a finished one.
    `texts` holds every response as text (filters, judge), `truncated` which were cut.
    With a jax `mesh`, the model is loaded and sampled sharded by `rules`.
    """
    config, params = load_hf(model_dir, mesh=mesh, rules=rules)
    tok = load_tokenizer(resolve_model_path(model_dir))
    prompts = [render_prompt(tok, p, chat_template=not isinstance(p, str)).tolist()
               for row in rows for p in row["sample_prompts"]]
    out = generate(config, params, prompts, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, seed=seed, tokenizer=tok,
                   stop_strings=tuple(stop_strings), mesh=mesh, rules=rules)
    records, n = [], 0
    for row in rows:
        c = len(row["prompts"])
        texts = [out.texts[n + j].strip() for j in range(c)]
        cut = [out.finish_reasons[n + j] == "length" for j in range(c)]
        records.append({**{k: v for k, v in row.items() if k != "sample_prompts"},
                        "responses": [list(out.tokens[n + j]) if cut[j] else texts[j]
                                      for j in range(c)],
                        "texts": texts, "truncated": cut,
                        "response_tokens": [len(out.tokens[n + j]) for j in range(c)]})
        n += c
    return records


def mi_per_query(logps_BCC) -> np.ndarray:
    """InfoNCE bound per query, averaged over its C targets: [b, i, j] = log p(y_j | x, c_i),
    target of column j is row j (`align_jax.eval.mi_lower_bound`, log-mean-exp over all C)."""
    x = jnp.asarray(logps_BCC, jnp.float32)
    c = x.shape[-1]
    per_BC = jax.vmap(jax.vmap(mi_lower_bound, in_axes=(1, 0)), in_axes=(0, None))(
        x, jnp.arange(c))
    return np.asarray(jnp.mean(per_BC, axis=1), np.float64)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    se = float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(np.mean(x)), se


def _mi_sums(config, params, batch):
    logps, mask = logprobs.forward_token_logps(config, params, batch, where="sami")
    total = logprobs.masked_sum(logps, mask)
    count = jnp.sum(mask.astype(jnp.float32), axis=-1)
    return jnp.stack([total, count], axis=1)  # [B, 2, C, C]


def mi_bound(model_dir: str, records: Sequence[dict], *, seq_len: int,
             batch_size: int = 8, mesh=None, rules: str = "fsdp") -> dict[str, float]:
    """The held-out MI bound of SAMI records under a model (scored over `mesh` when given):
    `mi_bound` with summed response log-probs (the bound) and `mi_bound_token_mean` with
    per-token means (the training loss's quantity), each with its standard error over queries.
    """

    config, params = load_hf(model_dir, mesh=mesh, rules=rules)
    tok = load_tokenizer(resolve_model_path(model_dir))
    examples, _, _ = format_records(records, kind="sami", tokenizer=tok, seq_len=seq_len,
                                    truncation="truncate_prompt_left", on_error="skip")
    if not examples:
        raise ValueError(f"sami: no held-out record fits seq_len {seq_len}")
    rows = score_examples(bind(_mi_sums, config), params, examples, build=batching.sami_batch,
                          seq_len=seq_len, batch_size=batch_size, pad_id=tok.pad_id or 0,
                          mesh=mesh, rules=rules)
    summed, counts = rows[:, 0], rows[:, 1]
    bound, se = _mean_se(mi_per_query(summed))
    token_bound, token_se = _mean_se(mi_per_query(summed / np.maximum(counts, 1.0)))
    lengths = [n for rec in records for n in rec.get("response_tokens", [])]
    return {"mi_bound": bound, "mi_bound_stderr": se, "mi_bound_token_mean": token_bound,
            "mi_bound_token_mean_stderr": token_se, "queries": len(examples),
            "mean_response_tokens": float(np.mean(lengths)) if lengths else float("nan")}


def params_checksum(model_dir: str, *, mesh=None, rules: str = "fsdp") -> float:
    """A checksum of a checkpoint's parameters (to tell which one an iteration started
    from): sum over leaves k of (k + 1) * sum(leaf), reduced on the devices (sharded over
    `mesh` when given, so a model larger than one device works)."""
    _, params = load_hf(model_dir, mesh=mesh, rules=rules)

    @jax.jit
    def total(leaves):
        return sum((k + 1) * jnp.sum(x.astype(jnp.float32)) for k, x in enumerate(leaves))
    return float(total(jax.tree.leaves(params)))


def lengths_by_constitution(records: Sequence[dict], names: Sequence[str]) -> dict[str, dict]:
    """Per constitution (by name): mean response tokens, its standard error, how many
    responses there are and how many were cut at the token budget."""
    groups: dict[int, list[tuple[int, bool]]] = {}
    for rec in records:
        cut = rec.get("truncated", [False] * len(rec["constitution_ids"]))
        for cid, n, t in zip(rec["constitution_ids"], rec["response_tokens"], cut):
            groups.setdefault(cid, []).append((n, bool(t)))
    out = {}
    for cid, rows in sorted(groups.items()):
        mean, se = _mean_se(np.array([n for n, _ in rows], np.float64))
        out[names[cid]] = {"mean": mean, "stderr": se, "n": len(rows),
                           "truncated": sum(t for _, t in rows)}
    return out


def win_rates(held: Sequence[dict], base: Sequence[dict], constitutions: Sequence[Sequence[str]],
              *, judge, template: str = "principles", seed: int = 0, max_tokens: int = 512,
              names: Sequence[str] | None = None) -> dict:
    """Win rate of `held` responses over `base` responses to the same held-out prompts, judged
    per constitution (the judge is shown that constitution's principles).

    Returns:
      {"win_rate": pooled over constitutions, "position_bias": pooled share of pairs whose
       two orders chose the same slot, "by_constitution": {name: WinRateResult.summary()}}.
    """
    names = list(names) if names is not None else [str(i) for i in range(len(constitutions))]
    groups: dict[int, tuple[list, list, list]] = {}
    for rec, ref in zip(held, base):
        for j, cid in enumerate(rec["constitution_ids"]):
            g = groups.setdefault(cid, ([], [], []))
            g[0].append(rec["prompt"])
            g[1].append(rec["texts"][j])
            g[2].append(ref["texts"][j])
    out, total, weights, same, parsed = {}, 0.0, 0, 0.0, 0
    for cid, (prompts, a, b) in sorted(groups.items()):
        res = pairwise_win_rate(prompts, a, b, judge=judge, template=template, seed=seed,
                                principles="\n".join(constitutions[cid]), max_tokens=max_tokens)
        out[names[cid]] = res.summary()
        total += res.win_rate * res.n_pairs
        weights += res.n_pairs
        if res.position_bias_pairs:
            same += res.position_bias * res.position_bias_pairs
            parsed += res.position_bias_pairs
    return {"win_rate": total / max(weights, 1),
            "position_bias": same / parsed if parsed else float("nan"),
            "by_constitution": out}


def _drop_checkpoints(run_dir: str) -> None:
    path = os.path.join(run_dir, "checkpoints")
    # Every process has finished its part of the last checkpoint before process 0 removes it.
    distributed.barrier(f"align_jax.sami.drop:{path}")
    if distributed.is_main() and os.path.isdir(path):
        shutil.rmtree(path)
    distributed.barrier(f"align_jax.sami.dropped:{path}")


@contextlib.contextmanager
def _timed(row: dict, phase: str):
    """Adds the wall and CPU (all threads of this process) seconds of a block to
    row["phase_seconds"][phase] and row["phase_cpu_seconds"][phase]."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        for key, t0, now in (("phase_seconds", wall, time.perf_counter()),
                             ("phase_cpu_seconds", cpu, time.process_time())):
            d = row.setdefault(key, {})
            d[phase] = round(d.get(phase, 0.0) + now - t0, 1)


def _write(path: str, rows: Sequence[dict]) -> str:
    # Multi-process: process 0 writes (a shared run folder), the others wait, then all read.
    if distributed.is_main():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(path, rows)
    distributed.barrier(f"align_jax.write:{path}")
    return path


def sami(*, output_dir: str, init_from: str, constitutions: str, queries: str,
         num_iterations: int = 3, steps_per_iteration: int = 2, batch_size: int = 8,
         constitutions_per_query: int = 2, eval_queries: int = 8, max_new_tokens: int = 350,
         temperature: float = 0.0, top_p: float = 1.0, learning_rate: float = 5e-7,
         prompt_format: str = "plain", example_format: bool = False,
         filters: Sequence[str] = sami_prompts.DEFAULT_FILTERS, init: str = "base",
         judge: str | None = None, judge_template: str = "principles",
         judge_max_tokens: int = 512, kl_coef: float = 0.0, seq_len: int = 512,
         vocab_chunk_size: int = 0, keep_checkpoints: bool = False,
         mesh: sharding.MeshSpec | None = None, rules: str = "fsdp",
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
      eval_queries: held-out queries for the MI bound and the win rates.
      max_new_tokens, temperature, top_p: response sampling (the paper: 350, greedy).
      learning_rate: constant, AdamW (the paper: 5e-7).
      prompt_format: "plain" (the paper's text, base models) or "chat" (chat template).
      example_format: plain format only: the paper's example block in sampling prompts.
      filters: response filters (sami_prompts.FILTERS) a query's responses must all pass.
      init: "base" retrains the base model each iteration (the paper's Algorithm 1);
        "latest" continues from the previous iterate (the reference code). The optimizer
        state starts fresh every iteration either way.
      judge: for win rates against the base model after each iteration: a teacher spec
        ("local:<dir>" or "openai:<url>") that writes its verdicts, or "letters:<dir or
        name>", a small local judge read from its P("A") vs P("B")
        (`align_jax.eval.letter_judge`); None skips them.
      judge_template: the judge template (align_jax.eval.judge), "principles" by default.
      judge_max_tokens: a writing judge's token budget per verdict.
      kl_coef: weight of the optional KL regulariser to the iteration's starting model (the
        base model under init='base'; losses.sami.sami_kl_penalty); 0 is the paper's default.
      seq_len: rows of (prompt, response).
      vocab_chunk_size: training's chunked log-softmax over the vocabulary (0: full logits);
        bounds the memory of large-vocabulary models.
      keep_checkpoints: keep each iteration's orbax checkpoints (parameters and optimizer
        state: 12 bytes a parameter in float32). By default they are removed once the
        iteration's hf/ export (its model) is written: the next iteration starts a fresh
        optimizer, and a rerun skips a completed iteration by its export.
      mesh, rules: the device mesh and sharding preset of training, sampling, the bound and
        a `local:` judge (as for `align-jax train`).
      seed, progress: as for `align-jax train`.
    """
    if init not in ("base", "latest"):
        raise ValueError(f"sami: init={init!r}; expected 'base' or 'latest'")
    out = os.path.abspath(output_dir)
    cons = load_constitutions(constitutions)
    prompts = [r.data["prompt"] for r in load_records(queries, schema="query")[0]]
    rng = random.Random(seed)
    rng.shuffle(prompts)
    held, pool = prompts[:eval_queries], prompts[eval_queries:]
    halves = [pool[0::2], pool[1::2]]
    if not held or not all(halves):
        raise ValueError(f"sami: {len(prompts)} queries in {queries} are too few for "
                         f"{eval_queries} held out and two training halves")
    c = constitutions_per_query
    names = constitution_names(constitutions)
    # Held-out prompts (draws and shuffles) are fixed once, so every iteration and the base
    # answer exactly the same prompts.
    held_rows = make_prompts(held, cons, _draws(len(held), len(cons), c, rng),
                             prompt_format=prompt_format, rng=random.Random(seed + 7919),
                             example_format=example_format)
    sample_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     stop_strings=sami_prompts.stop_strings(prompt_format))
    # Sampling, scoring and a local judge run sharded like training (a 7B model fits on no
    # single device).
    jmesh = sharding.make_mesh(mesh) if mesh is not None else None
    placed = dict(mesh=jmesh, rules=rules)
    teacher = None
    if judge:
        if judge.startswith("letters:"):
            teacher = LetterJudge(judge.partition(":")[2], **placed)
        else:
            teacher = make_teacher(judge, **(placed if judge.startswith("local:") else {}))
    shuffle_rng = random.Random(seed + 1)

    def train_rows(k):
        half = halves[(k - 1) % 2]
        qs = [half[i % len(half)] for i in range(steps_per_iteration * k * batch_size)]
        return make_prompts(qs, cons, _draws(len(qs), len(cons), c, rng),
                            prompt_format=prompt_format, rng=shuffle_rng,
                            example_format=example_format)

    def sample_and_evaluate(row, model_dir, k, base_held):
        # Model k writes the held-out responses and iteration k+1's training data in one
        # generation call (one compiled decode, batches filled across both).
        nxt = train_rows(k + 1) if k < num_iterations else []
        with _timed(row, "sample"):
            recs = sample_responses(model_dir, held_rows + nxt, seed=seed + k, **sample_kw,
                                    **placed)
        held_recs, train_recs = recs[:len(held_rows)], recs[len(held_rows):]
        _write(os.path.join(out, "eval", f"iter_{k}.jsonl"), held_recs)
        with _timed(row, "mi"):
            row.update(mi_bound(model_dir, held_recs, seq_len=seq_len, **placed))
        row["response_tokens_by_constitution"] = lengths_by_constitution(held_recs, names)
        row["eval_dropped"] = sami_prompts.apply_filters(held_recs, filters)[1]
        lengths = ", ".join(f"{n} {v['mean']:.1f} ({v['truncated']}/{v['n']} cut)"
                            for n, v in row["response_tokens_by_constitution"].items())
        _say(f"iter_{k}: MI bound {row['mi_bound']:.3f} +- {row['mi_bound_stderr']:.3f} nats "
             f"(summed log p; per-token {row['mi_bound_token_mean']:.4f}) on {row['queries']} "
             f"held-out queries; mean response tokens: {lengths}")
        if teacher is not None and k > 0:
            with _timed(row, "judge"):
                row["win_rate_vs_base"] = win_rates(held_recs, base_held, cons, judge=teacher,
                                                    template=judge_template, seed=seed,
                                                    max_tokens=judge_max_tokens, names=names)
            w = row["win_rate_vs_base"]
            _say(f"iter_{k}: win rate vs base " + ", ".join(
                f"{n} {v['win_rate']:.2f}" for n, v in w["by_constitution"].items())
                + f" (position bias {w['position_bias']:.2f})")
        return held_recs, train_recs

    t0 = time.time()
    report = {"init": init, "prompt_format": prompt_format, "filters": list(filters),
              "constitutions": names, "max_new_tokens": max_new_tokens,
              "mi_bound_note": "mi_bound: InfoNCE lower bound with log p summed over response "
                               "tokens; mi_bound_token_mean: with per-token mean log p, as in "
                               "the training loss (not a bound)",
              "iterations": []}
    row = {"iteration": 0, "model": init_from,
           "params_checksum": params_checksum(init_from, **placed)}
    base_held, train_recs = sample_and_evaluate(row, init_from, 0, None)
    row["seconds"] = round(time.time() - t0, 1)
    report["iterations"].append(row)
    sampler = init_from
    for k in range(1, num_iterations + 1):
        steps = steps_per_iteration * k
        row = {"iteration": k, "steps": steps}
        kept, dropped = sami_prompts.apply_filters(train_recs, filters)
        if not kept:
            raise ValueError(f"sami: iteration {k}: the filters {list(filters)} dropped all "
                             f"{len(train_recs)} queries ({dropped})")
        data = _write(os.path.join(out, f"iter_{k}", "data.jsonl"), kept)
        start = init_from if init == "base" else sampler
        _say(f"iteration {k}: sampled {len(train_recs)} x {c} responses with {sampler}, kept "
             f"{len(kept)} (dropped {dropped}); training {start} for {steps} steps")
        run_dir = os.path.join(out, f"iter_{k}", "train")
        with _timed(row, "train"):
            train_main(output_dir=run_dir, data=data, objective="sami", init_from=start,
                       seq_len=seq_len, batch_size=batch_size, num_steps=steps,
                       truncation="truncate_prompt_left", on_error="skip",
                       loss_kwargs={"kl_coef": kl_coef} if kl_coef else None,
                       optimizer=OptimizerConfig(learning_rate=learning_rate,
                                                 schedule="constant"),
                       vocab_chunk_size=vocab_chunk_size, mesh=mesh, rules=rules, seed=seed,
                       save_every=steps, log_every=1, progress=progress)
        if not keep_checkpoints:
            _drop_checkpoints(run_dir)
        sampler = os.path.join(run_dir, "hf")
        row.update(model=sampler, init_from=start,
                   init_checksum=params_checksum(start, **placed),
                   params_checksum=params_checksum(sampler, **placed), kept_queries=len(kept),
                   dropped=dropped)
        _, train_recs = sample_and_evaluate(row, sampler, k, base_held)
        row["seconds"] = round(time.time() - t0, 1)
        report["iterations"].append(row)
    if distributed.is_main():
        atomic_write_json(os.path.join(out, "report.json"), report)
        print(sami_report.write_report(out, report))
    return report
