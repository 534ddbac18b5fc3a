"""SAMI: teach a model to follow constitutions by maximising a mutual-information bound.

    align-jax run --gin_file=configs/runs/sami_demo.gin --output_dir=runs/sami_demo

Iteration k (1..N), after Algorithm 1 of the SAMI paper (Fränken et al. 2024):
  1. sample: for each training query and C constitutions drawn from the pool, the model of
     iteration k-1 (the base model for k = 1) writes one response per constitution, greedily
     by default (temperature 0, 350 tokens, the prompt format's stop strings); a query is kept
     only when all its responses pass the filters (methods/sami_prompts.py);
  2. train: starting from the base model (`init='base'`, the paper's algorithm box) or from
     the model of iteration k-1 (`init='latest'`, the reference code), with a fresh optimizer
     (AdamW, or RMSprop as for the paper's Mixtral run), take `steps_per_iteration * k` SAMI
     steps (one per batch of queries).
Queries alternate between two halves of the query set from one iteration to the next, so a
model never samples for the queries it was trained on. Prompts follow the paper's plain-text
formats (base models: dialogue, or "summary" for TL;DR; sampling can add the paper's example
block, `example_format`) or the chat template (instruct models), with each constitution's
principles shuffled per prompt by a seeded generator.

After every iteration (and for the base model, iteration 0) the held-out evaluation
(methods/sami_eval.py): the MI bound and the reference code's estimate (not a bound) over the
pool's constitutions, response lengths per constitution, and, with a `judge`, win rates of the
held-out responses under the one desired constitution (`eval_constitution`) against the base
model's and, with `compare_to`, against a second model's (an instruct model), with the judge's
position bias and both length controls. Each iteration also records the wall and CPU seconds
of its phases: train (make model k), sample (model k's held-out responses together with the
training data of iteration k+1, one generation call), mi (the estimates) and judge.
"""

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from align_jax import distributed, interrupts, sharding
from align_jax.atomic import atomic_write_json
from align_jax.data.formatting import render_prompt
from align_jax.data.sources import load_records
from align_jax.eval.letter_judge import LetterJudge
from align_jax.generate import generate
from align_jax.methods import sami_prompts, sami_report
from align_jax.methods.sami_eval import (  # noqa: F401 - re-exported: sami.mi_bound etc.
    MI_NOTE,
    judged,
    lengths_by_constitution,
    mean_se,
    mi_bound,
    mi_per_query,
    pick_eval_constitution,
)
from align_jax.methods.splits import check_split
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
    the sampler sees (the same, plus the paper's example block when `example_format`, and
    the format's response prefix, e.g. " The post" for summaries)."""
    prefix = sami_prompts.response_prefix(prompt_format)
    rows = []
    for q, draw in zip(queries, draws):
        orders = [sami_prompts.shuffled_principles(constitutions[i], rng) for i in draw]
        sample = [sami_prompts.sami_prompt(o, q, fmt=prompt_format, rng=None,
                                           example_format=example_format) for o in orders]
        rows.append({
            "prompt": q, "constitution_ids": list(draw),
            "constitutions": [sami_prompts.numbered(o) for o in orders],
            "prompts": [sami_prompts.sami_prompt(o, q, fmt=prompt_format, rng=None)
                        for o in orders],
            "sample_prompts": [f"{p} {prefix}" if prefix else p for p in sample]})
    return rows


def sample_responses(model_dir: str, rows: Sequence[dict], *, max_new_tokens: int = 350,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     stop_strings: Sequence[str] = (), response_prefix: str = "", mesh=None,
                     rules: str = "fsdp") -> list[dict]:
    """SAMI records: each row of `make_prompts` with one response per constitution.

    A response that ended (EOS or a stop string) is kept as text (cut before any stop
    string) and re-encoded with EOS for training and scoring, so a stop string never becomes
    part of a trained response. A response cut at `max_new_tokens` is kept as the sampled
    token ids, without EOS: a truncated response is not taught (or scored) as a finished one.
    `texts` holds every response as text (filters, judge), `truncated` which were cut. A
    `response_prefix` (the end of the sampling prompt, e.g. "The post") starts every
    response. With a jax `mesh`, the model is loaded and sampled sharded by `rules`.
    """
    config, params = load_hf(model_dir, mesh=mesh, rules=rules)
    tok = load_tokenizer(resolve_model_path(model_dir))
    prompts = [render_prompt(tok, p, chat_template=not isinstance(p, str)).tolist()
               for row in rows for p in row["sample_prompts"]]
    out = generate(config, params, prompts, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, seed=seed, tokenizer=tok,
                   stop_strings=tuple(stop_strings), mesh=mesh, rules=rules)
    prefix_ids = list(tok.encode(response_prefix, add_bos=False)) if response_prefix else []
    records, n = [], 0
    for row in rows:
        c = len(row["prompts"])
        texts = [(response_prefix + out.texts[n + j]).strip() for j in range(c)]
        cut = [out.finish_reasons[n + j] == "length" for j in range(c)]
        records.append({**{k: v for k, v in row.items() if k != "sample_prompts"},
                        "responses": [prefix_ids + list(out.tokens[n + j]) if cut[j]
                                      else texts[j] for j in range(c)],
                        "texts": texts, "truncated": cut,
                        "response_tokens": [len(prefix_ids) + len(out.tokens[n + j])
                                            for j in range(c)]})
        n += c
    return records


def params_checksum(model_dir: str, *, mesh=None, rules: str = "fsdp") -> float:
    """A checksum of a checkpoint's parameters (to tell which one an iteration started
    from): sum over leaves k of (k + 1) * sum(leaf), reduced on the devices (sharded over
    `mesh` when given, so a model larger than one device works)."""
    _, params = load_hf(model_dir, mesh=mesh, rules=rules)

    @jax.jit
    def total(leaves):
        return sum((k + 1) * jnp.sum(x.astype(jnp.float32)) for k, x in enumerate(leaves))
    return float(total(jax.tree.leaves(params)))


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


def _queries(src: str | Sequence[Mapping[str, Any]], what: str) -> list[str]:
    """Query texts from a JSONL file of records with a `prompt`, or from such records."""
    if isinstance(src, str):
        return [r.data["prompt"] for r in load_records(src, schema="query")[0]]
    out = []
    for i, r in enumerate(src):
        if not isinstance(r, Mapping) or not isinstance(r.get("prompt"), str):
            raise ValueError(f"sami: {what}[{i}] needs a string field 'prompt'")
        out.append(r["prompt"])
    return out


def _texts(records: Sequence[dict]) -> list[str]:
    return [r["texts"][0] for r in records]


def _recorded(path: str, out: str) -> str:
    """A model path as the report records it: relative to the run folder when inside it (a
    moved or copied folder reruns to the same report), else as given."""
    rel = os.path.relpath(os.path.abspath(path), out)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def sami(*, output_dir: str, init_from: str, constitutions: str,
         queries: str | Sequence[Mapping[str, Any]],
         heldout_queries: str | Sequence[Mapping[str, Any]] | None = None,
         num_iterations: int = 3, steps_per_iteration: int = 2, batch_size: int = 8,
         constitutions_per_query: int = 2, eval_queries: int = 8,
         eval_constitution: str | None = None, mi_constitutions: int | None = None,
         mi_batch_size: int = 8, max_new_tokens: int = 350, temperature: float = 0.0,
         top_p: float = 1.0, learning_rate: float = 5e-7, optimizer: str = "adamw",
         prompt_format: str = "plain", example_format: bool = False,
         filters: Sequence[str] = sami_prompts.DEFAULT_FILTERS, init: str = "base",
         judge: str | None = None, judge_template: str = "constitution",
         judge_max_tokens: int | None = None, compare_to: str | None = None,
         compare_to_format: str = "chat", kl_coef: float = 0.0, seq_len: int = 512,
         vocab_chunk_size: int = 0, keep_checkpoints: bool = False,
         mesh: sharding.MeshSpec | None = None, rules: str = "fsdp",
         seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Runs SAMI and returns the report (also <output_dir>/report.json, report.md, report.png).

    Args:
      output_dir: run folder; iteration k lives in iter_k/ (data.jsonl, the train run, hf/);
        eval/ holds the held-out responses of every iteration.
      init_from: the base model (Hugging Face dir with tokenizer files).
      constitutions: constitution records (e.g. from `align-jax sdg` task "principles").
      queries: records with a `prompt` field, as a JSONL path or a list (e.g. an SFT file, or
        `data.paper_datasets.hh_rlhf_first_turns(...)`); completions are ignored.
      heldout_queries: the held-out queries (path or list; the first `eval_queries` of them,
        in order, as the paper evaluates the first 250 queries of a split); None holds out
        `eval_queries` of the shuffled `queries`.
      num_iterations: N (the paper: 3).
      steps_per_iteration: N_b; iteration k takes N_b * k steps (the paper: 2, 4, 6).
      batch_size: queries per step (the paper: 128).
      constitutions_per_query: C (the paper: 2).
      eval_queries: held-out queries for the MI estimates and the win rates.
      eval_constitution: the `id` of the desired constitution: every held-out query is
        answered under it for the win rates (the paper: helpful and harmless, or concise and
        comprehensive); None takes the one constitution with no negated principle.
      mi_constitutions: constitutions per held-out query for the MI estimates; None all of the
        pool's (the paper scores all of its 4).
      mi_batch_size: held-out queries per scoring forward (each K x K rows).
      max_new_tokens, temperature, top_p: response sampling (the paper: 350, greedy).
      learning_rate: constant (the paper: 5e-7).
      optimizer: "adamw" (the paper's mistral-7b runs) or "rmsprop" (its mixtral-8x7b run;
        torch's defaults, `train.optim.OptimizerConfig`), or "adafactor".
      prompt_format: "plain" (the paper's dialogue text, base models), "summary" (its TL;DR
        layout, base models) or "chat" (chat template, instruct models).
      example_format: plain-text formats only: the paper's example block in sampling prompts
        (it samples with it and trains without it).
      filters: response filters (sami_prompts.FILTERS) a query's responses must all pass.
      init: "base" retrains the base model each iteration (the paper's Algorithm 1);
        "latest" continues from the previous iterate (the reference code). The optimizer
        state starts fresh every iteration either way.
      judge: for win rates: a teacher spec ("local:<dir>" or "openai:<url>") that writes its
        verdicts, or "letters:<dir or name>", a small local judge read from its P("A") vs
        P("B") (`align_jax.eval.letter_judge`); None skips them.
      judge_template: the judge template (align_jax.eval.judge): "constitution" (the paper's
        judge layout, "Final Response: A/B"), "constitution_summary" (its TL;DR judge),
        "principles", or "principles_choice" for a letters judge.
      judge_max_tokens: a writing judge's token budget per verdict (None: the template's).
      compare_to: a second model (e.g. the instruct version of the base) whose held-out
        responses under the same constitution every iteration is also judged against.
      compare_to_format: its prompt format ("chat" for an instruct model).
      kl_coef: weight of the optional per-position KL (over the vocabulary) from the
        iteration's starting model (the base under init='base'; losses.sami); 0 is the
        paper's default.
      seq_len: rows of (prompt, response).
      vocab_chunk_size: training's chunked log-softmax over the vocabulary (0: full logits);
        bounds the memory of large-vocabulary models.
      keep_checkpoints: keep each iteration's orbax checkpoints (parameters and optimizer
        state: 12 bytes a parameter in float32). By default they are removed once the
        iteration's hf/ export (its model) is written: the next iteration starts a fresh
        optimizer, and a rerun skips a completed iteration by its export.
      mesh, rules: the device mesh and sharding preset of training, sampling, the MI scoring
        and a `local:` judge (as for `align-jax train`).
      seed, progress: as for `align-jax train`.
    """
    if init not in ("base", "latest"):
        raise ValueError(f"sami: init={init!r}; expected 'base' or 'latest'")
    sami_prompts.sami_prompt(["x"], "y", fmt=prompt_format, rng=None,
                             example_format=example_format)  # bad settings fail here
    out = os.path.abspath(output_dir)
    cons_records = [r.data for r in load_records(constitutions, schema="constitution")[0]]
    cons = [list(r["principles"]) for r in cons_records]
    names = constitution_names(constitutions)
    eval_idx = pick_eval_constitution(cons_records, eval_constitution)
    prompts = _queries(queries, "queries")
    # What decides the held-out queries (the shuffle's seed, the count, their source);
    # refused when changed under trained iterations, whose queries could become held out.
    check_split(out, {"eval_queries": eval_queries, "seed": seed,
                      "heldout_queries": heldout_queries if isinstance(heldout_queries, str)
                      or heldout_queries is None else
                      "list sha256 " + hashlib.sha256(json.dumps(
                          _queries(heldout_queries, "heldout_queries")).encode()).hexdigest()[:16]},
                recipe="sami", stages=sorted(d for d in (os.listdir(out) if os.path.isdir(out)
                                                         else ()) if d.startswith("iter_")))
    rng = random.Random(seed)
    rng.shuffle(prompts)
    if heldout_queries is None:
        held, pool = prompts[:eval_queries], prompts[eval_queries:]
    else:
        held = _queries(heldout_queries, "heldout_queries")[:eval_queries]
        held_set = set(held)
        pool = [p for p in prompts if p not in held_set]
    halves = [pool[0::2], pool[1::2]]
    if not held or not all(halves):
        raise ValueError(f"sami: {len(prompts)} queries are too few for {eval_queries} held "
                         f"out and two training halves")
    c = constitutions_per_query
    k_all = len(cons)
    # Held-out prompts (draws and shuffles) are fixed once, so every iteration and the base
    # answer exactly the same prompts; the win-rate prompts of the compared model share the
    # eval prompts' principle orders (the same seeded shuffles).
    mi_draws = ([list(range(k_all))] * len(held) if mi_constitutions is None
                else _draws(len(held), k_all, mi_constitutions, rng))
    held_rows = make_prompts(held, cons, mi_draws, prompt_format=prompt_format,
                             rng=random.Random(seed + 7919), example_format=example_format)
    eval_rows = make_prompts(held, cons, [[eval_idx]] * len(held), prompt_format=prompt_format,
                             rng=random.Random(seed + 7907), example_format=example_format)
    sample_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     stop_strings=sami_prompts.stop_strings(prompt_format),
                     response_prefix=sami_prompts.response_prefix(prompt_format))
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
    eval_principles = sami_prompts.numbered(cons[eval_idx])
    judge_kw = dict(principles=eval_principles, judge=teacher, template=judge_template,
                    seed=seed, max_tokens=judge_max_tokens)
    shuffle_rng = random.Random(seed + 1)
    compare_recs = None

    def train_rows(k):
        half = halves[(k - 1) % 2]
        qs = [half[i % len(half)] for i in range(steps_per_iteration * k * batch_size)]
        return make_prompts(qs, cons, _draws(len(qs), len(cons), c, rng),
                            prompt_format=prompt_format, rng=shuffle_rng,
                            example_format=example_format)

    def sample_and_evaluate(row, model_dir, k, base_eval):
        # Model k writes the held-out responses (every pool constitution, and the eval
        # constitution) and iteration k+1's training data in one generation call (one
        # compiled decode, batches filled across them).
        nxt = train_rows(k + 1) if k < num_iterations else []
        with _timed(row, "sample"), interrupts.phase("sampling"):
            recs = sample_responses(model_dir, held_rows + eval_rows + nxt, seed=seed + k,
                                    **sample_kw, **placed)
        h, e = len(held_rows), len(eval_rows)
        held_recs, eval_recs, train_recs = recs[:h], recs[h:h + e], recs[h + e:]
        _write(os.path.join(out, "eval", f"iter_{k}.jsonl"), held_recs)
        _write(os.path.join(out, "eval", f"iter_{k}_{names[eval_idx]}.jsonl"), eval_recs)
        with _timed(row, "mi"), interrupts.phase("mi"):
            row.update(mi_bound(model_dir, held_recs, seq_len=seq_len, batch_size=mi_batch_size,
                                **placed))
        row["response_tokens_by_constitution"] = lengths_by_constitution(held_recs, names)
        row["eval_response_tokens"] = lengths_by_constitution(eval_recs, names)[names[eval_idx]]
        row["eval_dropped"] = sami_prompts.apply_filters(held_recs, filters)[1]
        lengths = ", ".join(f"{n} {v['mean']:.1f} ({v['truncated']}/{v['n']} cut)"
                            for n, v in row["response_tokens_by_constitution"].items())
        _say(f"iter_{k}: MI bound {row['mi_bound']:.3f} +- {row['mi_bound_stderr']:.3f} nats "
             f"over {row['mi_constitutions']} constitutions (reference estimate, not a bound: "
             f"{row['mi_reference']:.3f}; per-token bound {row['mi_bound_token_mean']:.4f}) on "
             f"{row['queries']} held-out queries; mean response tokens: {lengths}")
        if teacher is not None:
            with _timed(row, "judge"), interrupts.phase("judge"):
                against = {}
                if k > 0:
                    against["win_rate_vs_base"] = _texts(base_eval)
                if compare_recs is not None:
                    against["win_rate_vs_compare"] = _texts(compare_recs)
                for key, others in against.items():
                    row[key] = judged(held, _texts(eval_recs), others, **judge_kw)
            for key in ("win_rate_vs_base", "win_rate_vs_compare"):
                if key in row:
                    w = row[key]
                    _say(f"iter_{k}: {key.replace('_', ' ')} under {names[eval_idx]}: "
                         f"{w['win_rate']:.2f} +- {w['stderr']:.2f} (length-controlled "
                         f"{w['lc_stratified']:.2f} stratified, {w['lc_win_rate']:.2f} "
                         f"regression; position bias {w['position_bias']:.2f})")
        return eval_recs, train_recs

    t0 = time.time()
    report = {"init": init, "prompt_format": prompt_format, "example_format": example_format,
              "filters": list(filters), "constitutions": names,
              "eval_constitution": names[eval_idx], "eval_principles": cons[eval_idx],
              "max_new_tokens": max_new_tokens, "optimizer": optimizer,
              "judge": judge, "judge_template": judge_template if judge else None,
              "compare_to": compare_to, "mi_bound_note": MI_NOTE, "iterations": []}
    row = {"iteration": 0, "model": _recorded(init_from, out),
           "params_checksum": params_checksum(init_from, **placed)}
    if compare_to is not None:
        compare_rows = make_prompts(held, cons, [[eval_idx]] * len(held),
                                    prompt_format=compare_to_format,
                                    rng=random.Random(seed + 7907))
        with _timed(row, "sample"):
            compare_recs = sample_responses(
                compare_to, compare_rows, seed=seed, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p,
                stop_strings=sami_prompts.stop_strings(compare_to_format),
                response_prefix=sami_prompts.response_prefix(compare_to_format), **placed)
        _write(os.path.join(out, "eval", f"compare_to_{names[eval_idx]}.jsonl"), compare_recs)
        report["compare_to_response_tokens"] = lengths_by_constitution(
            compare_recs, names)[names[eval_idx]]
    base_eval, train_recs = sample_and_evaluate(row, init_from, 0, None)
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
        with _timed(row, "train"), interrupts.phase("train"):
            train_main(output_dir=run_dir, data=data, objective="sami", init_from=start,
                       seq_len=seq_len, batch_size=batch_size, num_steps=steps,
                       truncation="truncate_prompt_left", on_error="skip",
                       loss_kwargs={"kl_coef": kl_coef} if kl_coef else None,
                       optimizer=OptimizerConfig(name=optimizer, learning_rate=learning_rate,
                                                 schedule="constant"),
                       vocab_chunk_size=vocab_chunk_size, mesh=mesh, rules=rules, seed=seed,
                       save_every=steps, log_every=1, progress=progress)
        if not keep_checkpoints:
            _drop_checkpoints(run_dir)
        sampler = os.path.join(run_dir, "hf")
        row.update(model=_recorded(sampler, out), init_from=_recorded(start, out),
                   init_checksum=params_checksum(start, **placed),
                   params_checksum=params_checksum(sampler, **placed), kept_queries=len(kept),
                   dropped=dropped)
        _, train_recs = sample_and_evaluate(row, sampler, k, base_eval)
        row["seconds"] = round(time.time() - t0, 1)
        report["iterations"].append(row)
    with interrupts.phase("report"):
        if distributed.is_main():
            atomic_write_json(os.path.join(out, "report.json"), report)
            print(sami_report.write_report(out, report))
    return report
