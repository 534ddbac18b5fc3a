"""End-to-end SDG runs with the scripted teacher: summary, determinism, crash + resume."""

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import run_scripted_sdg
from scripted_teacher import ScriptedTeacher, WordTokenizer

from align_jax.data import documents
from align_jax.sdg import aligner_data, pipeline
from align_jax.sdg import store as store_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EXAMPLE = os.path.join(ROOT, "examples", "values_document.md")


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _snapshot(out_dir):
    """Every output file's bytes (summary without its out_dir field)."""
    snap = {}
    for dirpath, _, files in os.walk(out_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, out_dir)
            with open(path, "rb") as f:
                data = f.read()
            if rel == "summary.json":
                summary = json.loads(data)
                summary.pop("out_dir")
                data = json.dumps(summary, sort_keys=True).encode()
            snap[rel] = data
    return snap


@pytest.fixture
def small_doc(tmp_path):
    text = documents.load_document(EXAMPLE).text
    path = tmp_path / "small.md"
    path.write_text(text[:3000], encoding="utf-8")
    return str(path)


def _run(doc, out, *, seed=0, teacher=None, **kw):
    settings = {**run_scripted_sdg.SETTINGS, **kw}
    return pipeline.run_document_sdg([doc], out, teacher=teacher or ScriptedTeacher(),
                                     tokenizer=WordTokenizer(), seed=seed, progress=False,
                                     verbose=False, **settings)


def test_document_sdg_summary_matches_files(tmp_path):
    out = tmp_path / "run"
    teacher = ScriptedTeacher()
    summary = _run(EXAMPLE, out, teacher=teacher)
    chunks = documents.chunk_documents([documents.load_document(EXAMPLE)], WordTokenizer(),
                                       chunk_tokens=60, overlap=10)
    # Concurrency 2: per batch of 2 chunks, instruct makes a questions and an answers call,
    # preference a filter call and a pairs call unless no chunk of the batch passed.
    batches = (len(chunks) + 1) // 2
    assert 3 * batches <= len(teacher.calls) <= 4 * batches
    assert max(c["n"] for c in teacher.calls if c["temperature"] > 0) <= 2
    assert summary["num_chunks"] == len(chunks) and summary["units_finished"] == 2 * len(chunks)
    manifest = _lines(out / "raw" / "manifest.jsonl")
    raw_counts = collections.Counter()
    for entry in manifest:
        raw_counts.update(entry["counts"])
    for kind in ("sft", "preference"):
        info = summary["kinds"][kind]
        assert info["raw"] == raw_counts[kind] == len(_lines(out / "raw" / f"{kind}.jsonl")) > 0
        assert info["kept"] + info["exact_duplicates"] + info["near_duplicates"] == info["raw"]
        for split in store_lib.SPLITS:
            assert len(_lines(out / kind / f"{split}.jsonl")) == info["splits"][split]
        assert sum(info["splits"].values()) == info["kept"]
    filters = _lines(out / "raw" / "values_filter.jsonl")
    assert [f["chunk_id"] for f in filters] == [c.id for c in chunks]
    passing = {f["chunk_id"] for f in filters if f["passes"]}
    for split in store_lib.SPLITS:
        for rec in _lines(out / "preference" / f"{split}.jsonl"):
            assert rec["chunk_id"] in passing and rec["chosen"] != rec["rejected"]
            assert set(rec) == {"prompt", "chosen", "rejected", "chunk_id", "source"}
        for rec in _lines(out / "sft" / f"{split}.jsonl"):
            assert set(rec) == {"prompt", "completion", "chunk_id", "source"}
            assert rec["source"] == EXAMPLE
    # Garbage was produced, rejected and counted by reason, never crashing the run.
    rejects = _lines(out / "rejects.jsonl")
    counted = collections.Counter((r["stage"], r["reason"]) for r in rejects)
    assert {(s, r): n for s, d in summary["rejects"].items() for r, n in d.items()} == counted
    for reason in ("invalid_json", "no_items", "empty", "non_text"):
        assert counted[("instruct", reason)] > 0, reason
    for reason in ("no_verdict", "chosen_equals_rejected", "missing_field:unfaithful"):
        assert counted[("preference", reason)] > 0, reason
    assert json.loads((out / "summary.json").read_text()) == summary


def test_same_seed_same_records_other_seed_differs(tmp_path, small_doc):
    _run(small_doc, tmp_path / "a", seed=1)
    _run(small_doc, tmp_path / "b", seed=1)
    _run(small_doc, tmp_path / "c", seed=2)
    a, b, c = (_snapshot(tmp_path / x) for x in "abc")
    assert a == b
    assert a["raw/sft.jsonl"] != c["raw/sft.jsonl"]


def test_rerun_of_finished_run_is_a_no_op_and_settings_are_checked(tmp_path, small_doc):
    out = tmp_path / "run"
    _run(small_doc, out)
    before = _snapshot(out)
    teacher = ScriptedTeacher()
    _run(small_doc, out, teacher=teacher)
    assert teacher.calls == [] and _snapshot(out) == before
    with pytest.raises(ValueError, match=r"different settings \['seed'\]"):
        _run(small_doc, out, seed=5)


class _Crash(BaseException):
    pass


def test_crash_at_any_write_then_resume_equals_uninterrupted(tmp_path, small_doc, monkeypatch):
    ref = tmp_path / "ref"
    _run(small_doc, ref)
    reference = _snapshot(ref)
    appends = [0]
    original = store_lib.RunStore._append

    def counting(path, lines):
        appends[0] += 1
        original(path, lines)

    monkeypatch.setattr(store_lib.RunStore, "_append", staticmethod(counting))
    _run(small_doc, tmp_path / "count")
    total = appends[0]
    points = sorted({1, 2, 3, total} | set(random.Random(0).sample(range(1, total + 1), 8)))
    for point in points:
        out = tmp_path / f"crash{point}"
        calls = [0]

        def tearing(path, lines, point=point, calls=calls):
            calls[0] += 1
            if calls[0] == point:
                data = "".join(line + "\n" for line in lines)
                with open(path, "a", encoding="utf-8") as f:  # half a write, then death
                    f.write(data[:max(1, len(data) // 2)])
                raise _Crash(point)
            original(path, lines)

        monkeypatch.setattr(store_lib.RunStore, "_append", staticmethod(tearing))
        with pytest.raises(_Crash):
            _run(small_doc, out)
        monkeypatch.setattr(store_lib.RunStore, "_append", staticmethod(original))
        _run(small_doc, out)
        assert _snapshot(out) == reference, f"crash at append {point} of {total}"


def test_sigkill_at_random_times_then_resume_equals_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    run_scripted_sdg.main(str(ref), EXAMPLE, "7", "0")
    reference = _snapshot(ref)
    assert len(_lines(ref / "raw" / "manifest.jsonl")) > 40
    total = len(_lines(ref / "raw" / "manifest.jsonl"))
    out = tmp_path / "killed"
    manifest = out / "raw" / "manifest.jsonl"
    cmd = [sys.executable, os.path.join(HERE, "run_scripted_sdg.py"), str(out), EXAMPLE, "7",
           "0.01"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(1234)
    interrupted, progress = 0, []
    # Kill points are drawn over the run's progress (finished units), plus a random extra
    # delay so the signal lands anywhere inside a unit's writes, whatever the machine speed.
    for target in sorted(rng.sample(range(total), 6)):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        while proc.poll() is None and (
                len(manifest.read_bytes().splitlines()) if manifest.exists() else 0) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is None:
            interrupted += 1
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
        progress.append(len(manifest.read_bytes().splitlines()) if manifest.exists() else 0)
    done = subprocess.run(cmd, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    print("kills:", interrupted, "progress:", progress, "of", total)
    assert interrupted >= 4 and 0 < max(progress) < total, (interrupted, progress)
    assert _snapshot(out) == reference
    for kind in ("sft", "preference"):
        rows = _lines(out / "raw" / f"{kind}.jsonl")
        keys = [json.dumps(r, sort_keys=True) for r in rows]
        assert len(keys) == len(set(keys))  # nothing committed twice


def test_context_guard(tmp_path, small_doc):
    with pytest.raises(ValueError, match="no room for a chunk"):
        _run(small_doc, tmp_path / "a", teacher=ScriptedTeacher(context_length=1000))

    class HalfTokenizer:
        def encode(self, text):  # undercounts, so chunks would overflow the teacher
            return [0] * (len(text.split()) // 4)

    with pytest.raises(ValueError, match=r"chunk \w+ of .*small.md .* needs \d+ tokens"):
        pipeline.run_document_sdg([small_doc], tmp_path / "b",
                                  teacher=ScriptedTeacher(context_length=2200),
                                  tokenizer=HalfTokenizer(), chunk_tokens=400, overlap=0,
                                  progress=False, verbose=False)
    # With the teacher's own count (tokenizer=None) the same budget is respected.
    summary = pipeline.run_document_sdg([small_doc], tmp_path / "c",
                                        teacher=ScriptedTeacher(context_length=2200),
                                        chunk_tokens=400, overlap=0, progress=False,
                                        verbose=False, stages=("instruct",))
    assert summary["kinds"]["sft"]["kept"] > 0


def test_template_override_by_path(tmp_path, small_doc):
    custom = tmp_path / "my_questions.txt"
    custom.write_text("# mine\n---\nMY QUESTIONS x{nex} about {keyword}:\n{passage}\n")

    class Teacher(ScriptedTeacher):
        seen = []

        def role_of(self, prompt):
            if prompt.startswith("MY QUESTIONS"):
                self.seen.append(prompt)
                return "instruct_questions"
            return super().role_of(prompt)

    summary = _run(small_doc, tmp_path / "run", teacher=Teacher(), stages=("instruct",),
                   templates={"instruct_questions": str(custom)}, keyword="rights")
    assert Teacher.seen and all(p.startswith("MY QUESTIONS x3 about rights:") for p in Teacher.seen)
    assert summary["kinds"]["sft"]["kept"] > 0
    with pytest.raises(ValueError, match="unknown template role"):
        _run(small_doc, tmp_path / "run2", templates={"instruct_question": str(custom)})


def test_aligner_sdg_end_to_end_and_resume(tmp_path, monkeypatch):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(s) + "\n" for s in aligner_data.load_seed_questions()[:3]))
    cfg = aligner_data.AlignerDataConfig(rounds=1, topics_per_round=6, questions_per_call=5)
    kw = dict(teacher=ScriptedTeacher(), seed_questions=seeds, config=cfg, concurrency=4,
              progress=False, verbose=False)
    summary = pipeline.run_aligner_sdg(tmp_path / "ref", **kw)
    aligner, inspector = summary["kinds"]["aligner"], summary["kinds"]["inspector"]
    assert aligner["kept"] > 0 and inspector["raw"] == 2 * aligner["raw"]
    reasons = set(summary["rejects"]["aligner"])
    assert {"identity_rewrite", "missing_section:Aligned response"} <= reasons <= {
        "identity_rewrite", "leaked_marker", "missing_section:Aligned response"}
    by_question = collections.defaultdict(set)
    for split in store_lib.SPLITS:
        for rec in _lines(tmp_path / "ref" / "aligner" / f"{split}.jsonl"):
            assert rec["initial_response"] != rec["aligned_response"]
            by_question[rec["question_id"]].add(split)
        for rec in _lines(tmp_path / "ref" / "inspector" / f"{split}.jsonl"):
            assert rec["label"] in (0, 1)
            by_question[rec["question_id"]].add(split)
    assert all(len(s) == 1 for s in by_question.values())  # a question never straddles splits
    # Crash in the middle of the criterion units, then resume.
    calls, original = [0], store_lib.RunStore._append

    def tearing(path, lines):
        calls[0] += 1
        if calls[0] == 40:
            raise _Crash()
        original(path, lines)

    monkeypatch.setattr(store_lib.RunStore, "_append", staticmethod(tearing))
    with pytest.raises(_Crash):
        pipeline.run_aligner_sdg(tmp_path / "crashed", **{**kw, "teacher": ScriptedTeacher()})
    monkeypatch.setattr(store_lib.RunStore, "_append", staticmethod(original))
    pipeline.run_aligner_sdg(tmp_path / "crashed", **{**kw, "teacher": ScriptedTeacher()})
    assert _snapshot(tmp_path / "crashed") == _snapshot(tmp_path / "ref")


def test_principles_sdg_writes_constitutions(tmp_path):
    cons = pipeline.run_principles_sdg(tmp_path, teacher=ScriptedTeacher(), task="answering",
                                       principles=["helpful", "concise"], verbose=False)
    assert _lines(tmp_path / "constitutions.jsonl") == cons and len(cons) == 4
    assert [p["name"] for p in _lines(tmp_path / "principles.jsonl")] == ["helpful", "concise"]
    cons2 = pipeline.run_principles_sdg(tmp_path / "user", principles_file=os.path.join(
        ROOT, "examples", "principles.jsonl"), verbose=False)
    assert cons2 == _lines(os.path.join(ROOT, "examples", "constitutions.jsonl"))
    with pytest.raises(ValueError, match="principles_file, or teacher and task"):
        pipeline.run_principles_sdg(tmp_path)


def test_rounds_sample_afresh_dedup_and_resume_per_round(tmp_path, small_doc):
    one = _run(small_doc, tmp_path / "one", max_chunks=2)
    teacher = ScriptedTeacher()
    three = _run(small_doc, tmp_path / "three", teacher=teacher, max_chunks=2, rounds=3)
    assert one["num_chunks"] == three["num_chunks"] == 2
    units = [e["unit"] for e in _lines(tmp_path / "three" / "raw" / "manifest.jsonl")]
    assert len(units) == len(set(units)) == 2 * 2 * 3
    assert {u.rsplit("/", 1)[-1] for u in units if u.count("/") == 2} == {"r1", "r2"}
    # Each round's calls carry their own seed.
    sampled = [c["seed"] for c in teacher.calls if c["temperature"] > 0]
    assert len(sampled) == len(set(sampled))
    raw = three["kinds"]["sft"]["raw"]
    assert raw > one["kinds"]["sft"]["raw"]
    kept = three["kinds"]["sft"]
    assert kept["kept"] + kept["exact_duplicates"] + kept["near_duplicates"] == raw
    # Round 1 of the 3-round run is the 1-round run: same units, same seeds, same records.
    first = [r for r in _lines(tmp_path / "three" / "raw" / "sft.jsonl")
             if r["_unit"].count("/") == 1]
    assert first == _lines(tmp_path / "one" / "raw" / "sft.jsonl")
    # Resume: drop the last round's units from the manifest; a rerun redoes only them and
    # ends with the same lines in every file (the redone units are appended last).
    def lines_of(out):
        return {k: sorted(v.splitlines()) for k, v in _snapshot(out).items()}
    before = lines_of(tmp_path / "three")
    manifest = tmp_path / "three" / "raw" / "manifest.jsonl"
    kept_lines = [x for x in manifest.read_text().splitlines()
                  if not json.loads(x)["unit"].endswith("/r2")]
    manifest.write_text("\n".join(kept_lines) + "\n")
    again = ScriptedTeacher()
    _run(small_doc, tmp_path / "three", teacher=again, max_chunks=2, rounds=3)
    assert 0 < len(again.calls) < len(teacher.calls)
    assert lines_of(tmp_path / "three") == before
    with pytest.raises(ValueError, match="rounds"):
        _run(small_doc, tmp_path / "three", max_chunks=2, rounds=2)
