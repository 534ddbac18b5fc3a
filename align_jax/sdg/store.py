"""Append-only, crash-safe storage for SDG runs, then dedup, splits and a summary.

Layout of a run folder:

  raw/<kind>.jsonl     records as generated, each tagged with its work unit ("_unit")
  raw/rejects.jsonl    everything dropped, with the reason and the unit
  raw/manifest.jsonl   one line per finished work unit, written last
  <kind>/{train,validation,test}.jsonl   final records after `finalize`
  rejects.jsonl, summary.json            after `finalize`

Crash safety: a unit's records and rejects are appended, flushed and fsynced before its
manifest line is appended and fsynced. Opening the store keeps only lines of units named
in the manifest (dropping torn last lines and records of a unit that was cut short), so
a run killed at any instant and restarted neither loses nor repeats a record, provided the
generator is deterministic per unit (see `derive_seed`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
from collections.abc import Callable, Mapping, Sequence

from align_jax.jsonl import JsonlError, append_lines, decode_line, encode_line, write_jsonl

MANIFEST = "manifest.jsonl"
REJECTS = "rejects"
UNIT_KEY = "_unit"
SPLITS = ("train", "validation", "test")

# Fields that identify a record for deduplication, per record kind.
DEDUP_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt",),
    "preference": ("prompt",),
    "aligner": ("criterion", "input"),
    "inspector": ("criterion", "input", "response"),
    "questions": ("question",),
}


# Reject reasons that mean the teacher's output could not be read at all (as opposed to
# output that was read and then failed a check): the summary's parse failures.
PARSE_FAILURES = frozenset({"invalid_json", "no_items", "no_verdict", "empty", "incomplete",
                            "no_question", "no_sentence"})


@dataclasses.dataclass(kw_only=True)
class UnitResult:
    """What a stage produced for one work unit: records per kind, rejects, the number of
    teacher prompts the unit sent (`calls`; the summary's parse-failure rate is per prompt),
    and `error`: why one of its prompts got no answer (the unit is then not committed)."""
    unit: str
    records: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    rejects: list[dict] = dataclasses.field(default_factory=list)
    calls: int = 0
    error: str | None = None
    answered: int = 0  # prompts answered, counted when the stage passes owners to `ask`

    def fail(self, reason: str) -> None:
        """Mark the unit failed (its first reason is kept)."""
        if self.error is None:
            self.error = reason

    def reject(self, reason: str, text: str = "", **extra) -> None:
        """Record why a piece of output was dropped."""
        self.rejects.append({"reason": reason, "text": str(text)[:200], **extra})

    def add(self, kind: str, record: dict) -> None:
        """Keep a record of a kind."""
        self.records.setdefault(kind, []).append(record)


def derive_seed(seed: int, key: str) -> int:
    """A 31-bit seed from (global seed, unit or batch key), stable across runs and hosts."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _read_jsonl(path: str) -> tuple[list[dict], bool]:
    """Valid object lines of a file, and whether any line had to be dropped."""
    if not os.path.exists(path):
        return [], False
    with open(path, "rb") as f:
        data = f.read()
    out, dropped = [], False
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        # A last line without "\n" was torn by a crash even if it happens to parse.
        if i == len(lines) - 1:
            dropped = True
            continue
        try:
            obj = decode_line(line, where=f"{path}:{i + 1}")
        except JsonlError:
            dropped = True
            continue
        if isinstance(obj, dict):
            out.append(obj)
        else:
            dropped = True
    return out, dropped


class RunStore:
    """The raw, resumable part of a run folder (see module docstring).

    Args:
      out_dir: the run folder; created if missing.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = os.fspath(out_dir)
        self.raw_dir = os.path.join(self.out_dir, "raw")
        os.makedirs(self.raw_dir, exist_ok=True)
        self.finished: dict[str, dict] = {}
        self._recover()

    def _path(self, kind: str) -> str:
        return os.path.join(self.raw_dir, kind + ".jsonl")

    def _recover(self) -> None:
        manifest_path = os.path.join(self.raw_dir, MANIFEST)
        entries, dropped = _read_jsonl(manifest_path)
        entries = [e for e in entries if isinstance(e.get("unit"), str)]
        for e in entries:
            self.finished.setdefault(e["unit"], e)
        if dropped or len(self.finished) != len(entries):
            write_jsonl(manifest_path, self.finished.values())
        for name in sorted(os.listdir(self.raw_dir)):
            if name.endswith(".tmp"):  # a crash during a rewrite; the original is intact
                os.remove(os.path.join(self.raw_dir, name))
                continue
            if not name.endswith(".jsonl") or name == MANIFEST:
                continue
            path = os.path.join(self.raw_dir, name)
            rows, dropped = _read_jsonl(path)
            kept = [r for r in rows if r.get(UNIT_KEY) in self.finished]
            if dropped or len(kept) != len(rows):
                write_jsonl(path, kept)

    def is_done(self, unit: str) -> bool:
        """Whether the unit's records are safely on disk."""
        return unit in self.finished

    def commit(self, unit: str, records: Mapping[str, Sequence[dict]],
               rejects: Sequence[dict] = (), *, info: Mapping | None = None) -> None:
        """Durably store one finished unit: records and rejects first, manifest line last.

        Args:
          unit: the unit id, e.g. "instruct/<chunk id>".
          records: kind -> records (e.g. {"sft": [...]}); each gets "_unit" added.
          rejects: dicts with at least "reason"; each gets "_unit" and "stage" (the unit's
            prefix) unless present.
          info: extra fields for the manifest line.
        """
        if unit in self.finished:
            raise ValueError(f"unit {unit!r} is already committed")
        stage = unit.split("/", 1)[0]
        by_kind = {k: list(v) for k, v in records.items() if v}
        tagged_rejects = [{"stage": stage, **r, UNIT_KEY: unit} for r in rejects]
        if tagged_rejects:
            by_kind.setdefault(REJECTS, []).extend(tagged_rejects)
        for kind, rows in by_kind.items():
            if kind == REJECTS:
                lines = [encode_line(r)[:-1] for r in rows]
            else:
                lines = [encode_line({**r, UNIT_KEY: unit})[:-1] for r in rows]
            self._append(self._path(kind), lines)
        entry = {"unit": unit, "counts": {k: len(v) for k, v in records.items()},
                 "rejects": len(tagged_rejects), **(info or {})}
        self._append(os.path.join(self.raw_dir, MANIFEST), [encode_line(entry)[:-1]])
        self.finished[unit] = entry

    @staticmethod
    def _append(path: str, lines: Sequence[str]) -> None:
        """Appends encoded lines (no newline) in one fsynced write; the crash tests tear it here."""
        append_lines(path, [line + "\n" for line in lines])

    def records(self, kind: str) -> list[dict]:
        """Committed records of a kind, in commit order, with the "_unit" tag."""
        rows, _ = _read_jsonl(self._path(kind))
        return rows

    def kinds(self) -> list[str]:
        """Record kinds present in raw/ (rejects excluded)."""
        return sorted(n[:-6] for n in os.listdir(self.raw_dir)
                      if n.endswith(".jsonl") and n not in (MANIFEST, REJECTS + ".jsonl"))


def clear_run(out_dir: str | os.PathLike) -> None:
    """Removes what SDG wrote in a run folder (raw/, the split folders, rejects, summary), so
    a run can start over in it; other files (run_info.json, logs) stay."""
    out_dir = os.fspath(out_dir)
    for name in ("raw", *DEDUP_FIELDS):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
    for name in ("rejects.jsonl", "summary.json", "principles.jsonl", "constitutions.jsonl"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


# ------------------------------------------------------------------------ dedup, splits

_WORDS = re.compile(r"[^\W_]+", re.U)


def word_bigrams(text: str) -> frozenset[str]:
    """The set of lower-cased word bigrams of a text (its words when it has fewer than two)."""
    words = _WORDS.findall(text.lower())
    if len(words) < 2:
        return frozenset(words)
    return frozenset(a + " " + b for a, b in zip(words, words[1:]))


def jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the word-bigram sets of two texts (1.0 for two empty texts)."""
    sa, sb = word_bigrams(a), word_bigrams(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


_NUM_PERM, _BANDS = 32, 8  # 8 bands of 4 rows: pairs above ~0.6 Jaccard collide often


_PRIME = (1 << 61) - 1
# Fixed (a, b) pairs of the universal hashes h_i(x) = (a x + b) mod p that stand in for
# random permutations; fixed so signatures are the same on every run.
_PERMS = [(1 + (0x9E3779B97F4A7C15 * (i + 1)) % (_PRIME - 1),
           (0xC2B2AE3D27D4EB4F * (i + 7)) % _PRIME) for i in range(_NUM_PERM)]


def _minhash(shingles: frozenset[str]) -> list[int]:
    base = [int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")
            for s in shingles]
    if not base:
        return [_PRIME] * _NUM_PERM
    return [min((a * x + b) % _PRIME for x in base) for a, b in _PERMS]


def dedup_records(records: Sequence[dict], fields: Sequence[str], *,
                  near_threshold: float | None = 0.8) -> tuple[list[dict], list[dict]]:
    """Drop exact and near duplicates, keeping the first occurrence.

    Exact: same lower-cased, whitespace-squeezed text in `fields`. Near: same values in
    all fields but the last, and word-bigram Jaccard >= near_threshold on the last field
    (candidates found by MinHash LSH, then checked exactly, so cost stays ~linear).

    Args:
      records: dicts having `fields`.
      fields: identifying fields (see DEDUP_FIELDS).
      near_threshold: None disables near-duplicate removal.
    Returns:
      (kept, removed) where removed records carry "reason" exact_duplicate or
      near_duplicate and "duplicate_of" (index in `records` of the kept one).
    """
    kept, removed = [], []
    exact: dict[tuple, int] = {}
    buckets: dict[tuple, list[int]] = collections.defaultdict(list)
    texts: dict[int, tuple[str, frozenset]] = {}
    rows_per_band = _NUM_PERM // _BANDS
    for idx, rec in enumerate(records):
        values = [" ".join(str(rec.get(f, "")).lower().split()) for f in fields]
        key = tuple(values)
        if key in exact:
            removed.append({**rec, "reason": "exact_duplicate", "duplicate_of": exact[key]})
            continue
        if near_threshold is not None:
            prefix = tuple(values[:-1])
            shingles = word_bigrams(values[-1])
            sig = _minhash(shingles)
            band_keys = [(prefix, b, tuple(sig[b * rows_per_band:(b + 1) * rows_per_band]))
                         for b in range(_BANDS)]
            match = None
            for bk in band_keys:
                for other in buckets.get(bk, ()):
                    other_sh = texts[other][1]
                    union = len(shingles | other_sh)
                    sim = 1.0 if union == 0 else len(shingles & other_sh) / union
                    if sim >= near_threshold:
                        match = other
                        break
                if match is not None:
                    break
            if match is not None:
                removed.append({**rec, "reason": "near_duplicate", "duplicate_of": match})
                continue
            for bk in band_keys:
                buckets[bk].append(idx)
            texts[idx] = (values[-1], shingles)
        exact[key] = idx
        kept.append(rec)
    return kept, removed


def split_of(group: str, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> str:
    """Deterministic split for a group id (a chunk id): hash -> train/validation/test.

    Args:
      group: the id that must not straddle splits (all records of a chunk share it).
      fractions: train, validation, test shares; they must sum to 1.
    Returns:
      One of SPLITS.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1: {fractions}")
    u = int.from_bytes(hashlib.sha256(group.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def _group_of(record: dict) -> str:
    for key in ("chunk_id", "question_id"):
        if isinstance(record.get(key), str):
            return record[key]
    return record.get(UNIT_KEY, "")


def _length_stats(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    return {"count": len(values), "min": min(values), "mean": round(statistics.fmean(values), 2),
            "max": max(values)}


def finalize(store: RunStore, *, kinds: Sequence[str] | None = None,
             split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
             near_threshold: float | None = 0.8,
             count_tokens: Callable[[str], int] | None = None,
             extra: Mapping | None = None,
             select: Callable[[list[dict]], tuple[list[dict], list[dict]]] | None = None,
             unit_order: Sequence[str] | None = None, verbose: bool = True) -> dict:
    """Dedup, split and summarise a run's committed records; writes the final files.

    Args:
      store: the run's RunStore.
      kinds: record kinds to finalise (default: all in DEDUP_FIELDS found in raw/);
        other kinds (e.g. values_filter) are only counted.
      split_fractions: train/validation/test shares, assigned per chunk id hash.
      near_threshold: Jaccard threshold for near duplicates (None: exact only).
      count_tokens: measures text lengths; words (whitespace split) when None.
      extra: merged into the summary (e.g. run settings).
      select: applied to each kind's records after deduplication: (kept, removed), each
        removed record with a "reason" (e.g. the yes/no stage's balancing).
      unit_order: the run's units in planned order: records are taken in this order rather
        than commit order, so a run whose failed units were committed by a later rerun
        deduplicates and splits exactly as an undisturbed run.
      verbose: print the summary.
    Returns:
      The summary dict, also saved as <out_dir>/summary.json.
    """
    count = count_tokens or (lambda s: len(s.split()))
    unit = "tokens" if count_tokens else "words"
    present = store.kinds()
    kinds = [k for k in (kinds if kinds is not None else DEDUP_FIELDS) if k in present]
    summary: dict = {"out_dir": store.out_dir, "units_finished": len(store.finished),
                     "length_unit": unit, "kinds": {}, "rejects": {}}
    dedup_rejects = []
    order = {u: i for i, u in enumerate(unit_order or ())}

    def records(kind: str) -> list[dict]:
        rows = store.records(kind)
        if order:
            rows.sort(key=lambda r: order.get(r.get(UNIT_KEY), len(order)))
        return rows
    for kind in present:
        rows = records(kind)
        if kind not in kinds:
            summary["kinds"][kind] = {"raw": len(rows)}
            continue
        kept, removed = dedup_records(rows, DEDUP_FIELDS[kind], near_threshold=near_threshold)
        if select is not None:
            kept, dropped = select(kept)
            removed = removed + dropped
        for r in removed:
            dedup_rejects.append({"stage": kind, "reason": r["reason"], UNIT_KEY: r.get(UNIT_KEY),
                                  "text": json.dumps({k: v for k, v in r.items()
                                                      if k in DEDUP_FIELDS[kind]})[:200]})
        split_rows = {s: [] for s in SPLITS}
        for r in kept:
            split_rows[split_of(_group_of(r), split_fractions)].append(
                {k: v for k, v in r.items() if k != UNIT_KEY})
        os.makedirs(os.path.join(store.out_dir, kind), exist_ok=True)
        for s, srows in split_rows.items():
            write_jsonl(os.path.join(store.out_dir, kind, s + ".jsonl"), srows)
        lengths = collections.defaultdict(list)
        for r in kept:
            for field, value in r.items():
                if isinstance(value, str) and field not in ("chunk_id", "source", "question_id",
                                                            "criterion", UNIT_KEY):
                    lengths[field].append(count(value))
        summary["kinds"][kind] = {
            "raw": len(rows), "kept": len(kept),
            "exact_duplicates": sum(r["reason"] == "exact_duplicate" for r in removed),
            "near_duplicates": sum(r["reason"] == "near_duplicate" for r in removed),
            **({"balanced_out": n} if (n := sum(r["reason"] == "balance" for r in removed))
               else {}),
            "splits": {s: len(v) for s, v in split_rows.items()},
            "lengths": {f: _length_stats(v) for f, v in sorted(lengths.items())},
        }
    all_rejects = records(REJECTS) + dedup_rejects
    reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in all_rejects:
        reasons[str(r.get("stage", "?"))][str(r.get("reason", "?"))] += 1
    summary["rejects"] = {s: dict(sorted(c.items())) for s, c in sorted(reasons.items())}
    calls = sum(int(e.get("calls", 0)) for e in store.finished.values())
    if calls:
        summary["teacher_calls"] = calls
        summary["parse_failures"] = sum(r.get("reason") in PARSE_FAILURES
                                        for r in store.records(REJECTS))
    write_jsonl(os.path.join(store.out_dir, "rejects.jsonl"), all_rejects)
    if extra:
        summary.update(extra)
    with open(os.path.join(store.out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    if verbose:
        print(json.dumps(summary, indent=2, sort_keys=True))
    return summary
