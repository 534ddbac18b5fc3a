"""Evaluation at scale (issue 11, item 5): the whole `evaluate_models` vs the generation in it.

N held-out questions (synthetic, deterministic: sentences of the example document as reference
answers, preference pairs against another sentence), M models (tiny random Llama-style
checkpoints saved as Hugging Face dirs, the train section's 4-layer width-256 shape), each
also run with the retrieved passage in the prompt ("+ RAG"), so S = 2M systems, as the
value-alignment paper's table (4 models x without/with RAG = 8 systems).

Side by side in one process:
  (a) generation alone: the `generate_answers` calls `evaluate_models` makes (one per model,
      the plain and the RAG prompts together, same batch size and max_new_tokens), models
      already in memory, compilation warmed up;
  (b) the whole `evaluate_models`: loading the checkpoints, answer NLL (plain and RAG),
      preference accuracy, DPO's implicit reward (scored from the generation's own prefills
      where the prompt is a generated one, by `score_continuations` otherwise), retrieval,
      generation, BLEU, ROUGE,
      BERTScore (a tiny local BERT, or --bertscore-model) and the report files.
`--teacher-forced off` leaves the held-out NLL and preferences out of (b) (the papers'
evaluation alone: generated answers, reference metrics); `both` times (b) each way.
overhead = (b - a) / a, in wall and in CPU seconds (user + sys of the process: the better
guide on a machine shared with other jobs). (b) runs twice: the first run also compiles the
scorers (a fixed cost per process and shape); the second is the steady state. The breakdown
times each component inside (b) by wrapping the functions `evaluate_models` calls, and gives
the overhead within the steady run too: (b - its own generation) / its own generation.

`--model smollm2-135m-instruct` evaluates the real model (and its tokenizer) under M names
instead, with all-MiniLM-L6-v2 for BERTScore and retrieval unless told otherwise.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.data.documents import chunk_documents, load_documents
from align_jax.eval import answers as answers_lib
from align_jax.eval import report as report_lib
from align_jax.eval.retrieval import SemanticRetriever, with_retrieval
from align_jax.generate import trace_counts
from align_jax.models import transformer
from align_jax.models.config import get_config
from align_jax.models.hf import load_hf, save_hf
from align_jax.models.named import resolve_model_path
from align_jax.tokenizer import load_tokenizer
from align_jax.tokenizer_training import train_tokenizer
from benchmarks import common
from benchmarks.bench_generate import CPU_CONFIG

DOCUMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "values_document.md")
TOPICS = ("gifts", "conflicts of interest", "reporting", "the press", "safety", "privacy",
          "expenses", "suppliers", "complaints", "training", "meetings", "records")

# What the breakdown times: component -> the (module, function) pairs wrapped during (b); a
# function the code does not have is skipped (preference_accuracy: the code before issue 11's
# scale fixes, so that the same script measures both).
COMPONENTS = {
    "load checkpoints": [(report_lib, "load_hf")],
    "answer NLL": [(report_lib, "answer_nll")],
    "preference accuracy": [(report_lib, "preference_margins"),
                            (report_lib, "preference_accuracy")],
    # Since the prefill-shared scoring: completions whose prompt is not a generated one.
    # (The others are scored inside "generation", from its own prefill.)
    "scoring, prompts not generated": [(answers_lib, "score_continuations")],
    "retrieval": [(report_lib, "with_retrieval")],
    "generation": [(answers_lib, "generate")],
    # Per-sentence statistics and per-answer scores since the bootstrap intervals (the
    # corpus values are computed from them); the names before, for older code.
    "BLEU": [(answers_lib, "bleu_statistics"), (answers_lib, "bleu")],
    "ROUGE": [(answers_lib, "rouge_scores"), (answers_lib, "rouge")],
    "intervals and evidence": [(report_lib, "interval_table"), (report_lib, "replicates"),
                               (report_lib, "preference_evidence"),
                               (report_lib, "yes_no_evidence")],
    "BERTScore load": [(report_lib, "load_bertscore_model")],
    "BERTScore": [(answers_lib, "bertscore")],
    "report.md": [(report_lib, "_write_markdown")],
    "report.csv": [(report_lib, "_write_csv")],
    "plots": [(report_lib, "plot_metrics")],
}


def _sentences(text: str) -> list[str]:
    words = " ".join(x for x in text.splitlines() if x and not x.startswith("#"))
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", words) if len(s.split()) >= 6]


def build_records(n: int, seed: int = 0, *, distinct_pref_prompts: bool = False
                  ) -> tuple[list[dict], list[dict], list[str]]:
    """(SFT records, preference records, document lines): deterministic for (n, seed).

    The preference pairs ask the held-out questions themselves, or with
    `distinct_pref_prompts` questions of their own (as the demo's held-out pairs do)."""
    text = open(DOCUMENT, encoding="utf-8").read()
    sents = _sentences(text)
    rng = np.random.default_rng(seed)
    sft, pref = [], []
    for i in range(n):
        ref = sents[int(rng.integers(len(sents)))]
        other = sents[int(rng.integers(len(sents)))]
        topic = TOPICS[i % len(TOPICS)]
        prompt = (f"Question {i + 1}: what does the handbook ask of employees about {topic}, "
                  f"and why?")
        sft.append({"prompt": prompt, "completion": ref})
        pref.append({"prompt": f"In one sentence: {prompt}" if distinct_pref_prompts else prompt,
                     "chosen": ref, "rejected": other})
    return sft, pref, [x for x in text.splitlines() if x]


def tiny_bert(path: str, lines: list[str], *, hidden: int = 128, layers: int = 4) -> str:
    """A random BERT (WordPiece vocabulary of the document's words) saved for BERTScore."""
    import torch
    import transformers
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]+", " ".join(lines))})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", ":"] + words
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)},
                                     model_max_length=512)
    tok.save_pretrained(path)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=hidden,
                                     num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=4 * hidden, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def tiny_models(base: str, lines: list[str], count: int) -> tuple[dict[str, str], object]:
    """`count` random 4-layer width-256 checkpoints sharing one trained tokenizer."""
    tok = train_tokenizer(lines, os.path.join(base, "tok"), vocab_size=1024)
    cfg = get_config("small_20m", **{**CPU_CONFIG, "vocab_size": tok.vocab_size},
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    models = {}
    for k in range(count):
        path = os.path.join(base, f"model{k}")
        train_tokenizer(lines, path, vocab_size=1024)  # each checkpoint dir carries its tokenizer
        save_hf(cfg, transformer.init_params(cfg, jax.random.key(k)), path)
        models[f"model{k}"] = path
    return models, tok


def _clock() -> np.ndarray:
    """(wall s, CPU s of this process: user + sys, all threads)."""
    return np.array([time.perf_counter(), time.process_time()])


def _thread_clock() -> np.ndarray:
    """(wall s, CPU s of the calling thread): for work in evaluate_generation's host thread."""
    return np.array([time.perf_counter(), time.thread_time()])


@contextlib.contextmanager
def timed_components(seconds: collections.defaultdict):
    """Wraps every COMPONENTS function so its (wall, CPU) seconds add to seconds[component].

    Yields the set of components that ran off the main thread (BLEU and ROUGE, overlapping
    the generation): their CPU seconds are their thread's, their wall time overlaps others.
    """
    saved, background = [], set()
    for comp, module, name in [(c, m, n) for c, fns in COMPONENTS.items() for m, n in fns
                               if hasattr(m, n)]:
        fn = getattr(module, name)

        def wrapper(*a, _fn=fn, _comp=comp, **kw):
            main = threading.current_thread() is threading.main_thread()
            clock = _clock if main else _thread_clock
            t0 = clock()
            try:
                return _fn(*a, **kw)
            finally:
                seconds[_comp] = seconds[_comp] + (clock() - t0)
                if not main:
                    background.add(_comp)
        saved.append((module, name, fn))
        setattr(module, name, wrapper)
    try:
        yield background
    finally:
        for module, name, fn in reversed(saved):
            setattr(module, name, fn)


@contextlib.contextmanager
def compile_seconds():
    """Seconds XLA spent compiling inside the block (jax's backend-compile events)."""
    box = {"seconds": 0.0, "count": 0, "on": True}

    def listener(event, duration, **_):
        if box["on"] and event == "/jax/core/compile/backend_compile_duration":
            box["seconds"] += duration
            box["count"] += 1
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield box
    finally:
        box["on"] = False


def generation_only(loaded, tok, prompts, rag_prompts, *, max_new_tokens):
    """(a): exactly the generate_answers calls evaluate_generation makes."""
    out = {}
    for name, (config, params) in loaded.items():
        sets = {name: prompts, name + report_lib.RAG_SUFFIX: rag_prompts}
        out.update(answers_lib.generate_answers(config, params, tok, sets,
                                                max_new_tokens=max_new_tokens))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=64, help="held-out questions N")
    parser.add_argument("--models", type=int, default=4,
                        help="models M; each also runs with RAG, so 2M systems")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512, help="scoring length")
    parser.add_argument("--model", default=None,
                        help="a real checkpoint or named model evaluated under M names "
                             "(default: M tiny random models)")
    parser.add_argument("--bertscore-model", default=None,
                        help="encoder for BERTScore and retrieval (default: a tiny random "
                             "BERT; all-minilm-l6-v2 with --model)")
    parser.add_argument("--distinct-pref-prompts", action="store_true",
                        help="preference pairs on prompts that are not the held-out questions")
    parser.add_argument("--teacher-forced", choices=("on", "off", "both"), default="on",
                        help="(b) with the teacher-forced held-out scores (answer NLL, "
                             "preferences), without them (the generated-answer evaluation "
                             "alone), or both, one after the other")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    sft, pref, lines = build_records(args.questions,
                                     distinct_pref_prompts=args.distinct_pref_prompts)
    base = tempfile.mkdtemp(prefix="bench_eval_")
    try:
        if args.model is None:
            models, tok = tiny_models(base, lines, args.models)
            encoder = args.bertscore_model or tiny_bert(os.path.join(base, "bert"), lines)
        else:
            path = resolve_model_path(args.model)
            models = {f"{args.model}#{k}": path for k in range(args.models)}
            tok = load_tokenizer(path)
            encoder = args.bertscore_model or "all-minilm-l6-v2"
        label = args.model or f"tiny {CPU_CONFIG['num_layers']}x{CPU_CONFIG['embed_dim']}"
        chunks = chunk_documents(load_documents([DOCUMENT]), tok, chunk_tokens=128, overlap=16)
        retriever = SemanticRetriever([c.text for c in chunks], model=resolve_model_path(encoder))
        names = list(models)
        kw = dict(models=models, tokenizer=tok, sft_test=sft, pref_test=pref,
                  retriever=retriever, rag_models=tuple(names),
                  reference=(names[-1], names[0]) if len(names) > 1 else None,
                  seq_len=args.seq_len, max_new_tokens=args.max_new_tokens,
                  bertscore_model=encoder)

        # (a) generation alone: warm-up (compiles), then timed.
        loaded = {n: load_hf(p) for n, p in models.items()}
        prompts = [r["prompt"] for r in sft]
        rag_prompts = [r["prompt"] for r in with_retrieval(sft, retriever)]
        before = trace_counts()
        generation_only(loaded, tok, prompts, rag_prompts, max_new_tokens=args.max_new_tokens)
        t0 = _clock()
        answers = generation_only(loaded, tok, prompts, rag_prompts,
                                  max_new_tokens=args.max_new_tokens)
        gen = _clock() - t0
        gen_traces = {k: v - before.get(k, 0) for k, v in trace_counts().items()}
        del loaded

        # (b) the whole evaluation, twice per mode: cold (scorers compile) and steady.
        modes = ("off", "on") if args.teacher_forced == "both" else (args.teacher_forced,)
        runs = []
        for mode in modes:
            for run in ("first", "steady"):
                out_dir = os.path.join(base, f"report_{mode}_{run}")
                os.makedirs(out_dir)
                seconds = collections.defaultdict(lambda: np.zeros(2))
                with timed_components(seconds) as background, compile_seconds() as comp:
                    t0 = _clock()
                    report = report_lib.evaluate_models(out_dir, **kw,
                                                        teacher_forced=mode == "on")
                    total = _clock() - t0
                assert report["answers"] == answers, "evaluate_models answered differently"
                runs.append((f"teacher-forced {mode}, {run}", total, seconds, comp,
                             background))

        systems, n = 2 * len(models), args.questions

        def row(what, key, t):
            return {key: what, "wall s": t[0], "CPU s": t[1], "CPU ms per question": 1e3 * t[1] / n,
                    "share of generation (wall)": t[0] / gen[0],
                    "share of generation (CPU)": t[1] / gen[1]}
        prefs = "distinct" if args.distinct_pref_prompts else "the questions'"
        rows = [row(f"(a) generation alone ({label}, N={n}, S={systems}, "
                    f"new={args.max_new_tokens}, preference prompts: {prefs})", "what", gen)]
        for run, total, _, comp, _ in runs:
            rows.append(row(f"(b) evaluate_models, {run} (XLA compiles: {comp['count']}, "
                            f"{comp['seconds']:.1f} s)", "what", total))
        print(common.table(rows))
        summary = {"questions": n, "systems": systems, "max_new_tokens": args.max_new_tokens,
                   "distinct_pref_prompts": bool(args.distinct_pref_prompts)}
        breakdowns = []
        for name, total, seconds, _, background in runs:
            overhead = (total - gen) / gen
            summary.update({f"overhead ({name}) {k}": float(overhead[i])
                            for i, k in enumerate(("wall", "cpu"))})
            if not name.endswith("steady"):
                continue
            key = f"component ({name} run)"
            breakdown = [row(c + (" (host thread, during generation)" if c in background
                                  else ""), key, seconds[c]) for c in COMPONENTS]
            breakdown.append(row("other", key, total - sum(
                seconds[c] for c in COMPONENTS if c not in background)))
            print()
            print(common.table(breakdown))
            breakdowns += breakdown
            # The same within (b): everything but generation over (b)'s own generation time
            # (insensitive to the machine's load changing between (a) and (b)). With the
            # teacher-forced scores on, (b)'s generation also scores the completions of its
            # own prompts, so this understates their cost; (b - a) / a is the measure.
            inside = (total - seconds["generation"]) / seconds["generation"]
            summary.update({f"overhead within ({name}) {k}": float(inside[i])
                            for i, k in enumerate(("wall", "cpu"))})
        print()
        for k, v in summary.items():
            print(f"{k}: {v:+.1%}" if k.startswith("overhead") else f"{k}: {v}")
        print(f"generation traces in (a)'s warm-up: {gen_traces}")
        common.save("eval", rows + breakdowns + [summary])
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before the timers
    main()
