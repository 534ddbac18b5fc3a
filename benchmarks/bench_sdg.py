"""Synthetic data generation (issue 5): records/s and teacher tokens/s of `run_document_sdg`.

Three teachers on the same document, chunks and settings:
  local:  `make_teacher("local:<dir>")` on a tiny random model (a tokenizer trained on
          examples/values_document.md, vocab 512) at concurrency 1 and 16 (chunks per
          teacher call, i.e. the generate batch);
  instant: a teacher written here that answers every template at once with fixed, valid
          output, so the time left is the pipeline itself: templating, parsing, the store's
          fsynced commits, dedup and finalize ("the overhead of the store").
A random model writes no parsable questions, pairs or verdicts, so with it only the questions
and values-filter calls run and most records are rejects; "records" counts committed records
of every kind, rejects included. Teacher tokens are the completions re-encoded with the
teacher's tokenizer. Every local run follows a warm-up run of the same shapes in another
folder, so compilation is excluded.
"""

import argparse
import hashlib
import json
import os
import random
import tempfile
import time

import jax

from align_jax.generate import trace_counts
from align_jax.models import hf, transformer
from align_jax.models.config import get_config
from align_jax.sdg import instruct, preference
from align_jax.sdg.backends import make_teacher
from align_jax.sdg.pipeline import run_document_sdg
from align_jax.sdg.templates import load_template
from align_jax.tokenizer import load_tokenizer
from align_jax.tokenizer_training import train_tokenizer
from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENT = os.path.join(ROOT, "examples", "values_document.md")
WORDS = ("employee manager client supplier gift meal travel record contract data privacy "
         "password visitor meeting colleague customer partner report audit budget expense "
         "policy safety office family conflict interest consent complaint training").split()


class CountingTeacher:
    """Forwards to a teacher and counts calls, prompts and completion tokens."""

    def __init__(self, inner):
        self.inner = inner
        self.context_length = inner.context_length
        self.calls = self.prompts = self.completion_tokens = 0

    def count_tokens(self, text):
        return self.inner.count_tokens(text)

    def _count(self, n, outs):
        self.calls += 1
        self.prompts += n
        self.completion_tokens += sum(self.inner.count_tokens(o) for o in outs)
        return outs

    def complete(self, prompts, **kw):
        return self._count(len(prompts), self.inner.complete(prompts, **kw))

    def chat(self, conversations, **kw):
        return self._count(len(conversations), self.inner.chat(conversations, **kw))


class InstantTeacher:
    """Answers each default template's prompt immediately with well-formed output.

    The content is a hash of the prompt and its position, so records differ and survive
    dedup; the format is what the stage parses (JSON lines, a yes/no verdict, plain text).
    """

    ROLES = ("instruct_questions", "instruct_answer", "values_filter", "preference_pairs")

    def __init__(self, tokenizer, context_length, nex):
        self.tokenizer, self.context_length, self.nex = tokenizer, context_length, nex
        bodies = {r: load_template(r).body for r in self.ROLES}
        self._prefixes = {r: b[:b.index("{")] for r, b in bodies.items()}

    def count_tokens(self, text):
        return len(self.tokenizer.encode(text))

    def _words(self, rng, k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    def _answer(self, prompt, i):
        role = next(r for r, p in self._prefixes.items() if prompt.startswith(p))
        rng = random.Random(hashlib.sha256(f"{i}\x00{prompt}".encode()).digest())
        if role == "instruct_questions":
            return "\n".join(json.dumps({"question": self._words(rng, 9).capitalize() + "?"})
                             for _ in range(self.nex))
        if role == "instruct_answer":
            return "The passage says the " + self._words(rng, 14) + "."
        if role == "values_filter":
            return "Yes - it sets rules about " + self._words(rng, 3) + "."
        return "\n".join(json.dumps({"question": self._words(rng, 9).capitalize() + "?",
                                     "faithful": "Follow the rule on " + self._words(rng, 8),
                                     "unfaithful": "Ignore it and " + self._words(rng, 8)})
                         for _ in range(self.nex))

    def complete(self, prompts, *, temperature, top_p=1.0, max_tokens, seed=None):
        return [self._answer(p, i) for i, p in enumerate(prompts)]

    def chat(self, conversations, *, temperature, top_p=1.0, max_tokens, seed=None):
        return self.complete([c[-1]["content"] for c in conversations],
                             temperature=temperature, max_tokens=max_tokens)


def build_checkpoint(path, *, max_position):
    """A tiny random model with a tokenizer trained on the document: a `local:` checkpoint."""
    with open(DOCUMENT, encoding="utf-8") as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    tok = train_tokenizer(lines, path, vocab_size=512)
    config = get_config("tiny", vocab_size=tok.vocab_size, max_position=max_position,
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                        pad_token_id=tok.pad_id)
    hf.save_hf(config, transformer.init_params(config, jax.random.key(0)), path)
    return load_tokenizer(path)


def run_once(teacher, tokenizer, out_dir, args, concurrency):
    counting = CountingTeacher(teacher)
    i_cfg = instruct.InstructConfig(question_max_tokens=args.max_tokens,
                                    answer_max_tokens=args.max_tokens)
    p_cfg = preference.PreferenceConfig(filter_max_tokens=32, pair_max_tokens=2 * args.max_tokens)
    traces = sum(trace_counts().values())
    t0 = time.perf_counter()
    summary = run_document_sdg([DOCUMENT], out_dir, teacher=counting, tokenizer=tokenizer,
                               nex=args.nex, chunk_tokens=args.chunk_tokens, overlap=16,
                               concurrency=concurrency, instruct_config=i_cfg,
                               preference_config=p_cfg, progress=False, verbose=False)
    wall = time.perf_counter() - t0
    records = sum(k["raw"] for k in summary["kinds"].values())
    rejects = sum(sum(c.values()) for c in summary["rejects"].values())
    return {"chunks": summary["num_chunks"], "records": records, "rejects": rejects,
            "teacher calls": counting.calls, "wall s": wall,
            "records/s": records / wall, "records+rejects/s": (records + rejects) / wall,
            "teacher tok/s": counting.completion_tokens / wall,
            "compiles": sum(trace_counts().values()) - traces}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="questions/answers budget (pairs: twice this)")
    parser.add_argument("--nex", type=int, default=3)
    parser.add_argument("--max-position", type=int, default=1536)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "teacher")
        tokenizer = build_checkpoint(ckpt, max_position=args.max_position)
        local = make_teacher(f"local:{ckpt}")
        instant = InstantTeacher(tokenizer, local.context_length, args.nex)
        for c in args.concurrency:
            run_once(local, tokenizer, os.path.join(tmp, f"warm{c}"), args, c)
            r = run_once(local, tokenizer, os.path.join(tmp, f"local{c}"), args, c)
            rows.append({"teacher": f"local: tiny random model, concurrency {c}", **r})
        for c in args.concurrency:
            r = run_once(instant, tokenizer, os.path.join(tmp, f"instant{c}"), args, c)
            rows.append({"teacher": f"instant (store + pipeline overhead), concurrency {c}",
                         **r})
    print(common.table(rows))
    common.save("sdg", rows)


if __name__ == "__main__":
    main()
