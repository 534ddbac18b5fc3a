"""Where the value-alignment recipe's records come from: SDG, given files, held-out sets.

Training records come from the sources named in `train_on`: "sdg" (what the teacher wrote
from the document) and "files" (`sft_data` / `preference_data`). Held-out records are the
given test files, or else a split by prompt of the training pool. Before anything trains,
every training record whose prompt is the same as (or a near duplicate of, word-bigram
Jaccard >= 0.8, as SDG's own deduplication) a held-out question is dropped and counted, so a
held-out number never scores a question the model trained on. The report's "Training data"
section lists every source with its record counts (`provenance_lines`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from align_jax.data.sources import load_records
from align_jax.sdg.backends import make_teacher
from align_jax.sdg.pipeline import run_document_sdg
from align_jax.sdg.store import split_of, word_bigrams

SOURCES = ("sdg", "files")
_NEAR = 0.8


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecipeData:
    """Training and held-out records, and where each came from.

    provenance: rows {"set", "source", "records", "chunks"} (chunks: distinct grounding
      chunks among the records, None for records without one).
    leaks_dropped: training records dropped because a held-out question repeats them.
    """

    sft_train: list[dict]
    sft_test: list[dict]
    pref_train: list[dict]
    pref_test: list[dict]
    origin: str
    provenance: list[dict]
    sdg_summary: dict | None
    leaks_dropped: int


def records(path: str, schema: str) -> list[dict]:
    """The records of a JSONL file in a DESIGN.md schema (a bad line names file and line)."""
    return [r.data for r in load_records(path, schema=schema)[0]]


def _maybe(path: str, schema: str) -> list[dict]:
    # An empty split file is normal for a small SDG run.
    return records(path, schema) if os.path.exists(path) and os.path.getsize(path) else []


def _split(rows: list[dict], heldout: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split by prompt: the same prompt is never on both sides."""
    train, test = [], []
    for r in rows:
        side = split_of(r["prompt"], (1 - heldout, heldout, 0.0))
        (train if side == "train" else test).append(r)
    return train, test


def _sdg_stage(record: Mapping) -> str:
    return "yes_no" if "frame" in record else ("preference" if "chosen" in record
                                               else "instruct")


def _tagged(rows: list[dict], source: str) -> list[dict]:
    return [{**r, "_from": source} for r in rows]


def drop_leaks(train: list[dict], heldout_prompts: Sequence[str]) -> tuple[list[dict], int]:
    """Drops training records whose prompt repeats a held-out prompt exactly (case and
    spacing aside) or nearly (word-bigram Jaccard >= 0.8); returns (kept, dropped count)."""
    held = [_norm(p) for p in heldout_prompts]
    exact = set(held)
    shingles = [word_bigrams(p) for p in held]
    kept = []
    for r in train:
        prompt = _norm(r["prompt"])
        mine = word_bigrams(prompt)
        if prompt in exact or any(_jaccard(mine, other) >= _NEAR for other in shingles):
            continue
        kept.append(r)
    return kept, len(train) - len(kept)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


def gather(out: str, *, document: str, teacher: str | None, tokenizer,
           sdg_kwargs: Mapping[str, Any], teacher_kwargs: Mapping[str, Any] | None,
           sft_data: str | None, preference_data: str | None,
           train_on: Sequence[str] | None,
           sft_test: str | None, preference_test: str | None, heldout_fraction: float,
           heldout_questions: Sequence[str] = ()) -> RecipeData:
    """Runs SDG (with a teacher), reads the files, splits, guards against leaks.

    Args:
      out: the run folder (SDG writes <out>/sdg).
      document, teacher, tokenizer, sdg_kwargs, teacher_kwargs: as the recipe's.
      sft_data, preference_data: given training files.
      train_on: which of "sdg", "files" train (None: those that are given).
      sft_test, preference_test: held-out files; None splits `heldout_fraction` of the
        training pool off by prompt.
      heldout_questions: more held-out prompts no training record may repeat (yes/no set).
    Returns:
      The RecipeData.
    """
    if train_on is None:  # whatever is given: SDG with a teacher, and the files
        train_on = tuple(s for s, given in (("sdg", teacher is not None),
                                            ("files", bool(sft_data or preference_data)))
                         if given)
    unknown = sorted(set(train_on) - set(SOURCES))
    if unknown or not train_on:
        raise ValueError(f"value_alignment.train_on must be a non-empty subset of {SOURCES}, "
                         f"got {list(train_on)}")
    if "sdg" in train_on and teacher is None:
        raise ValueError("value_alignment.train_on includes 'sdg' but no `teacher` is given")
    if "files" in train_on and sft_data is None and preference_data is None:
        raise ValueError("value_alignment.train_on includes 'files' but neither `sft_data` "
                         "nor `preference_data` is given")
    sft, pref, summary, parts = [], [], None, []
    if teacher is not None and "sdg" in train_on:
        sdg_dir = os.path.join(out, "sdg")
        summary = run_document_sdg([document], sdg_dir,
                                   teacher=make_teacher(teacher, **dict(teacher_kwargs or {})),
                                   tokenizer=tokenizer, **dict(sdg_kwargs))
        # The recipe makes its own held-out split (or takes given files): pool SDG's splits.
        for kind, bucket in (("sft", sft), ("preference", pref)):
            for split in ("train", "validation", "test"):
                for r in _maybe(os.path.join(sdg_dir, kind, f"{split}.jsonl"), kind):
                    bucket.append({**r, "_from": f"SDG {_sdg_stage(r)} stage, teacher "
                                                 f"{teacher}"})
        parts.append(f"SDG with teacher {teacher} ({len(sft)} SFT, {len(pref)} preference)")
    if "files" in train_on:
        if sft_data is not None:
            sft += _tagged(records(sft_data, "sft"), f"file {sft_data}")
            parts.append(f"{sft_data}")
        if preference_data is not None:
            pref += _tagged(records(preference_data, "preference"), f"file {preference_data}")
            parts.append(f"{preference_data}")
    if not sft or not pref:
        where = (f" (reasons in {os.path.join(out, 'sdg', 'rejects.jsonl')})"
                 if summary is not None else "")
        raise ValueError(f"value_alignment: {len(sft)} SFT and {len(pref)} preference records "
                         f"to train on from {list(train_on)}{where}: both are needed")
    if sft_test is not None:
        sft_train, sft_held = sft, records(sft_test, "sft")
    else:
        sft_train, sft_held = _split(sft, heldout_fraction)
    if preference_test is not None:
        pref_train, pref_held = pref, records(preference_test, "preference")
    else:
        pref_train, pref_held = _split(pref, heldout_fraction)
    held = ([r["prompt"] for r in sft_held] + [r["prompt"] for r in pref_held]
            + list(heldout_questions))
    sft_train, sft_leaks = drop_leaks(sft_train, held)
    pref_train, pref_leaks = drop_leaks(pref_train, held)
    provenance = []
    for name, rows in (("SFT train", sft_train), ("preference train", pref_train)):
        by_source = collections.defaultdict(list)
        for r in rows:
            by_source[r["_from"]].append(r)
        for source, group in sorted(by_source.items()):
            chunks = {r["chunk_id"] for r in group if r.get("chunk_id")}
            provenance.append({"set": name, "source": source, "records": len(group),
                               "chunks": len(chunks) if chunks else None})
    for name, rows, path in (("SFT held out", sft_held, sft_test),
                             ("preference held out", pref_held, preference_test)):
        provenance.append({"set": name, "source": f"file {path}" if path else
                           f"{heldout_fraction:.0%} of the training pool, by prompt",
                           "records": len(rows), "chunks": None})
    strip = (lambda rows: [{k: v for k, v in r.items() if k != "_from"} for r in rows])
    return RecipeData(sft_train=strip(sft_train), sft_test=strip(sft_held),
                      pref_train=strip(pref_train), pref_test=strip(pref_held),
                      origin=" + ".join(parts), provenance=provenance, sdg_summary=summary,
                      leaks_dropped=sft_leaks + pref_leaks)


def sdg_counts(summary: Mapping[str, Any]) -> str:
    """One markdown paragraph: records the teacher wrote and kept, and rejects by reason."""
    kinds = summary.get("kinds", {})
    wrote = ", ".join(f"{k} {v.get('raw', 0)} written / {v.get('kept', v.get('raw', 0))} kept"
                      + (f" ({v['balanced_out']} left out for balance)"
                         if v.get("balanced_out") else "")
                      for k, v in kinds.items()) or "nothing"
    rejects = [f"{stage}: " + ", ".join(f"{reason} {n}" for reason, n in sorted(d.items()))
               for stage, d in sorted(summary.get("rejects", {}).items())]
    calls = summary.get("teacher_calls")
    failed = summary.get("parse_failures")
    call_line = (f" Teacher calls: {calls}; output that could not be read: {failed} "
                 f"({failed / calls:.1%})." if calls else "")
    return (f"SDG over {summary.get('num_chunks', '?')} chunk(s): {wrote}. Rejected: "
            + ("; ".join(rejects) if rejects else "none") + "." + call_line)


def provenance_lines(data: RecipeData) -> list[str]:
    """The report's "Training data" section: every source of every set, with counts."""
    lines = ["## Training data", "",
             "Where every record that trained or was held out came from (chunks: the distinct "
             "document chunks the records are grounded in).", "",
             "| set | source | records | chunks |", "|---|---|---|---|"]
    for p in data.provenance:
        lines.append(f"| {p['set']} | {p['source']} | {p['records']} | "
                     f"{'-' if p['chunks'] is None else p['chunks']} |")
    lines += ["", f"Training records dropped because a held-out question repeats them "
                  f"(exactly or nearly): {data.leaks_dropped}."]
    if data.sdg_summary is not None:
        lines += ["", sdg_counts(data.sdg_summary)]
    return lines
