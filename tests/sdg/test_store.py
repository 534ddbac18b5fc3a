"""Crash-safe store, dedup, splits and summary."""

import collections
import json
import random

import pytest

from align_jax.sdg import store as store_lib
from align_jax.sdg.store import RunStore


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_commit_and_reopen(tmp_path):
    s = RunStore(tmp_path)
    s.commit("instruct/a", {"sft": [{"prompt": "p1", "completion": "c1"}]},
             [{"reason": "empty", "text": "x"}])
    s.commit("instruct/b", {"sft": [{"prompt": "p2", "completion": "c2"}], "other": []})
    with pytest.raises(ValueError, match="already committed"):
        s.commit("instruct/a", {"sft": []})
    s2 = RunStore(tmp_path)
    assert s2.is_done("instruct/a") and s2.is_done("instruct/b") and not s2.is_done("instruct/c")
    assert [r["prompt"] for r in s2.records("sft")] == ["p1", "p2"]
    assert s2.records("rejects") == [{"stage": "instruct", "reason": "empty", "text": "x",
                                      "_unit": "instruct/a"}]
    assert s2.kinds() == ["sft"]


def test_recovery_drops_torn_lines_and_unfinished_units(tmp_path):
    s = RunStore(tmp_path)
    s.commit("u/1", {"sft": [{"prompt": "keep"}]})
    raw = tmp_path / "raw"
    # Unit 2 wrote its records but died before the manifest line; unit 3 tore a line.
    with open(raw / "sft.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "orphan", "_unit": "u/2"}) + "\n")
        f.write('{"prompt": "torn", "_un')
    with open(raw / "rejects.jsonl", "a") as f:
        f.write(json.dumps({"reason": "r", "_unit": "u/2"}) + "\n")
    s2 = RunStore(tmp_path)
    assert [r["prompt"] for r in s2.records("sft")] == ["keep"]
    assert s2.records("rejects") == []
    assert (raw / "sft.jsonl").read_text().endswith("\n")
    # A manifest line torn mid-write leaves its unit unfinished.
    s2.commit("u/2", {"sft": [{"prompt": "second"}]})
    manifest = raw / "manifest.jsonl"
    manifest.write_bytes(manifest.read_bytes()[:-5])
    s3 = RunStore(tmp_path)
    assert not s3.is_done("u/2") and s3.is_done("u/1")
    assert [r["prompt"] for r in s3.records("sft")] == ["keep"]
    # A last line that parses but lacks its newline also counts as torn.
    s3.commit("u/2", {"sft": [{"prompt": "second"}]})
    manifest.write_bytes(manifest.read_bytes()[:-1])
    assert not RunStore(tmp_path).is_done("u/2")
    # Leftover tmp files from a crash during a rewrite are removed.
    (raw / "sft.jsonl.tmp").write_text("junk")
    RunStore(tmp_path)
    assert not (raw / "sft.jsonl.tmp").exists()


def test_derive_seed():
    assert store_lib.derive_seed(0, "a") == store_lib.derive_seed(0, "a")
    seeds = {store_lib.derive_seed(s, k) for s in range(5) for k in "abcde"}
    assert len(seeds) == 25 and all(0 <= x < 2**31 for x in seeds)


def test_dedup_exact_and_near():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    base = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(40)]
    recs = [{"prompt": t} for t in base]
    # Exact repeats (case and spacing differ) and near repeats (one word changed).
    recs += [{"prompt": "  " + base[i].upper() + " "} for i in range(5)]
    near = []
    for i in range(5, 15):
        words = base[i].split()
        words[-1] = "changed"
        near.append({"prompt": " ".join(words)})
    recs += near
    kept, removed = store_lib.dedup_records(recs, ("prompt",), near_threshold=0.8)
    assert [r["prompt"] for r in kept] == base
    reasons = collections.Counter(r["reason"] for r in removed)
    assert reasons == {"exact_duplicate": 5, "near_duplicate": 10}
    for r in removed:
        assert store_lib.jaccard(r["prompt"], recs[r["duplicate_of"]]["prompt"]) >= 0.8
    # Independent brute-force check: no kept pair is above the threshold.
    for i in range(len(kept)):
        for j in range(i):
            assert store_lib.jaccard(kept[i]["prompt"], kept[j]["prompt"]) < 0.8
    kept, removed = store_lib.dedup_records(recs, ("prompt",), near_threshold=None)
    assert len(kept) == 50 and len(removed) == 5
    # Near duplicates only count within the same leading fields (e.g. criterion).
    pair = [{"criterion": "a", "input": base[0]}, {"criterion": "b", "input": base[0] + " x"}]
    assert len(store_lib.dedup_records(pair, ("criterion", "input"))[0]) == 2


def test_jaccard():
    assert store_lib.jaccard("a b c", "a b c") == 1.0
    assert store_lib.jaccard("a b c", "a b d") == pytest.approx(1 / 3)  # {ab, bc} vs {ab, bd}
    assert store_lib.jaccard("", "") == 1.0


def test_split_of_is_deterministic_and_proportional():
    ids = [f"{i:016x}" for i in range(20000)]
    splits = [store_lib.split_of(i, (0.8, 0.1, 0.1)) for i in ids]
    assert splits == [store_lib.split_of(i, (0.8, 0.1, 0.1)) for i in ids]
    counts = collections.Counter(splits)
    assert abs(counts["train"] / 20000 - 0.8) < 0.02
    assert abs(counts["validation"] / 20000 - 0.1) < 0.02
    with pytest.raises(ValueError, match="summing to 1"):
        store_lib.split_of("x", (0.5, 0.1, 0.1))


def test_finalize_counts_and_files(tmp_path, capsys):
    s = RunStore(tmp_path)
    chunks = [f"chunk{i}" for i in range(30)]
    expected_raw = 0
    for i, cid in enumerate(chunks):
        recs = [{"prompt": f"question {i} {k} " + "filler " * k, "completion": "one two three",
                 "chunk_id": cid, "source": "doc"} for k in range(3)]
        if i % 10 == 0:  # an exact duplicate of the previous chunk's first prompt
            recs.append({**recs[0], "prompt": f"question {max(i - 1, 0)} 0 "})
        expected_raw += len(recs)
        s.commit(f"instruct/{cid}", {"sft": recs, "values_filter": [{"chunk_id": cid}]},
                 [{"reason": "empty"}] * (i % 3))
    summary = store_lib.finalize(s, kinds=("sft",), split_fractions=(0.6, 0.2, 0.2),
                                 count_tokens=lambda t: len(t.split()))
    sft = summary["kinds"]["sft"]
    assert sft["raw"] == expected_raw == 93
    assert sft["exact_duplicates"] == 3 and sft["near_duplicates"] == 0
    assert sft["kept"] == 90 == sum(sft["splits"].values())
    assert summary["kinds"]["values_filter"] == {"raw": 30}
    assert summary["rejects"] == {"instruct": {"empty": 30}, "sft": {"exact_duplicate": 3}}
    assert sft["lengths"]["completion"] == {"count": 90, "min": 3, "mean": 3.0, "max": 3}
    by_split = {}
    for split in store_lib.SPLITS:
        rows = _lines(tmp_path / "sft" / f"{split}.jsonl")
        assert len(rows) == sft["splits"][split]
        for r in rows:
            assert "_unit" not in r
            assert store_lib.split_of(r["chunk_id"], (0.6, 0.2, 0.2)) == split
            by_split.setdefault(r["chunk_id"], set()).add(split)
    assert all(len(v) == 1 for v in by_split.values())
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert len(_lines(tmp_path / "rejects.jsonl")) == 33
    assert '"kept": 90' in capsys.readouterr().out
