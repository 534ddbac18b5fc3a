"""The yes/no stage: frames decide the answers, the rule grounds them, checks count rejects."""

import collections
import json

import pytest
from scripted_teacher import ScriptedTeacher

from align_jax.data.documents import Chunk, chunk_id
from align_jax.sdg import yes_no
from align_jax.sdg.pipeline import run_document_sdg
from align_jax.sdg.rules import Clause

DOC = """## Safety

Never work on a roof alone. Report every near miss within the same working day.

## Gifts

Small gifts may be accepted and shared with the team. Do not accept cash from a supplier.
You do not have to say what the medicine is.
"""


def _chunk(text):
    return Chunk(id=chunk_id(text), source="doc.md", text=text, start=0, end=len(text),
                 num_tokens=len(text.split()))


def test_frames_give_both_answers_for_every_kind():
    for kind in ("prohibits", "requires", "permits"):
        answers = {m[kind] for m in yes_no.FRAMES.values() if kind in m}
        assert answers == {"yes", "no"}, kind
    clause = Clause(kind="prohibits", text="Never work on a roof alone.", sentence="")
    seen = collections.Counter()
    for k in range(40):
        frames = yes_no.pick_frames(clause, key=f"u/{k}", count=2)
        assert len(set(frames)) == 2
        got = [yes_no.FRAMES[f]["prohibits"] for f in frames]
        assert sorted(got) == ["no", "yes"], frames  # one of each, whatever the key
        seen.update(frames)
        assert frames == yes_no.pick_frames(clause, key=f"u/{k}", count=2)  # deterministic
    assert len(seen) >= 4  # keys spread over the frames


@pytest.mark.parametrize("body, problem", [
    (" work on a roof alone?", None),
    (" work on the roof by myself when it rains?", None),
    (" work on a roof with my best friend and the neighbours today?", "off_rule"),
    (" eat a sandwich in the park?", "off_rule"),
    (" not work on a roof alone?", "negation_added"),
    (" work on a roof without a helmet alone?", "negation_added"),
])
def test_question_checks(body, problem):
    clause = Clause(kind="prohibits", text="Never work on a roof alone.", sentence="")
    assert yes_no.question_problem(body, clause, min_overlap=0.5) == problem


def test_direct_frames_answer_by_the_rules_kind_and_balance_the_batch():
    teacher = ScriptedTeacher(garbage=False)
    config = yes_no.YesNoConfig(min_cosine=None, questions_per_rule=2)  # frames="direct"
    (res,) = yes_no.generate_yes_no(teacher, [_chunk(DOC)], seed=3, config=config)
    sft = res.records["sft"]
    for s in sft:
        assert s["frame"] in yes_no.DIRECT_FRAMES[s["rule_kind"]]
        assert s["answer"] == ("no" if s["rule_kind"] == "prohibits" else "yes")
    # 2 forbidding rules, 3 requiring or permitting ones: the 2 get 3 questions each, the 3
    # get 2 each: 6 "no" and 6 "yes" questions, each rule's frames distinct.
    counts = collections.Counter(s["answer"] for s in sft)
    assert counts == {"yes": 6, "no": 6}
    per_rule = collections.Counter(s["rule"] for s in sft)
    assert sorted(per_rule.values()) == [2, 2, 2, 3, 3]
    assert len({(s["rule"], s["frame"]) for s in sft}) == len(sft)
    assert yes_no.direct_counts([], 2) == {"prohibits": 2, "requires": 2, "permits": 2}


def test_stage_records_answers_from_the_rules_wording():
    teacher = ScriptedTeacher(garbage=False)
    config = yes_no.YesNoConfig(min_cosine=None, questions_per_rule=2, frames="mixed")
    (res,) = yes_no.generate_yes_no(teacher, [_chunk(DOC)], seed=3, config=config)
    sft, pref = res.records["sft"], res.records["preference"]
    assert not res.rejects and len(sft) == len(pref) == 10  # 5 rules x 2 frames
    truth = {"Never work on a roof alone.": {"work on a roof alone": False},
             "Do not accept cash from a supplier.": {"accept cash from a supplier": False}}
    for s, p in zip(sft, pref):
        assert s["prompt"] == p["prompt"] and s["completion"] == p["chosen"]
        assert s["prompt"].startswith(s["frame"] + " ") and s["prompt"].endswith("?")
        assert s["answer"] == yes_no.FRAMES[s["frame"]][s["rule_kind"]]
        assert s["completion"] == f"{s['answer'].capitalize()}. {s['rule'][0].upper()}" \
            f"{s['rule'][1:]}"
        wrong = "No" if s["answer"] == "yes" else "Yes"
        assert p["rejected"].startswith(wrong + ". ")
        assert any(p["rejected"][len(wrong) + 2:].startswith(st)
                   for st in yes_no.STANCES["not_required" if "do not have to" in s["rule"]
                                            else s["rule_kind"]])
        assert s["chunk_id"] == chunk_id(DOC) and s["source"] == "doc.md"
        for rule, acts in truth.items():
            if s["rule"] == rule:
                # A prohibited action: "Can I <it>?" is no, "Is it against the code to <it>?"
                # is yes, whatever the frame.
                allowed = acts[next(iter(acts))]
                flip = s["frame"] in ("Is it against the code to", "Should I avoid")
                assert s["answer"] == ("yes" if allowed != flip else "no")
    counts = collections.Counter(s["answer"] for s in sft)
    assert counts["yes"] == counts["no"] == 5  # one yes- and one no-frame per rule


def test_stage_counts_every_kind_of_garbage():
    teacher = ScriptedTeacher(garbage=True)
    config = yes_no.YesNoConfig(min_cosine=None, questions_per_rule=4, frames="mixed")
    results = []
    for r in range(6):
        results += yes_no.generate_yes_no(teacher, [_chunk(DOC)], seed=r, config=config,
                                          round_index=r)
    reasons = collections.Counter(x["reason"] for res in results for x in res.rejects)
    assert {"off_rule", "no_question", "negation_added", "unfaithful_self_contradicting",
            "no_sentence"} <= set(reasons)
    for res in results:
        for p in res.records.get("preference", []):
            assert " never " not in p["rejected"] and p["rejected"].endswith(".")
        for s in res.records.get("sft", []):
            assert s["prompt"].endswith("?") and " not " not in s["prompt"].split(" ", 3)[-1]


def test_balance_records_trims_polarity_and_length():
    rows = []
    for i in range(60):
        answer = "yes" if i % 3 else "no"  # 40 yes, 20 no
        chosen = "x" * (10 if i % 4 else 40)  # chosen mostly shorter
        rows.append({"prompt": f"q{i}", "answer": answer, "chosen": chosen, "rejected": "y" * 20})
    rows.append({"prompt": "open question", "chosen": "a", "rejected": "b"})  # no answer: kept
    kept, removed = yes_no.balance_records(rows, shorter_range=(0.4, 0.6))
    graded = [r for r in kept if "answer" in r]
    counts = collections.Counter(r["answer"] for r in graded)
    assert counts["yes"] == counts["no"] > 0
    for answer in ("yes", "no"):
        side = [r for r in graded if r["answer"] == answer]
        share = sum(len(r["chosen"]) < len(r["rejected"]) for r in side) / len(side)
        assert 0.4 - 1 / len(side) <= share <= 0.6 + 1 / len(side)
    # When length cannot be balanced (every chosen answer shorter), at most half goes for it.
    same = [{"prompt": f"p{i}", "answer": "yes" if i % 2 else "no", "chosen": "a",
             "rejected": "bbb"} for i in range(20)]
    kept_same, _ = yes_no.balance_records(same)
    assert len(kept_same) == 10
    assert {"prompt": "open question", "chosen": "a", "rejected": "b"} in kept
    assert len(kept) + len(removed) == len(rows)
    assert all(r["reason"] == "balance" for r in removed)
    assert yes_no.balance_records(rows, shorter_range=(0.4, 0.6))[0] == kept  # every time


def test_pipeline_writes_balanced_yes_no_data(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    summary = run_document_sdg(
        [str(doc)], tmp_path / "run", teacher=ScriptedTeacher(garbage=True),
        stages=["yes_no"], rounds=3, chunk_tokens=64, overlap=0, progress=False,
        verbose=False, split_fractions=(1.0, 0.0, 0.0),
        yes_no_config=yes_no.YesNoConfig(min_cosine=None, questions_per_rule=4))
    for kind in ("sft", "preference"):
        info = summary["kinds"][kind]
        assert info["kept"] > 0
        assert info["kept"] + info["exact_duplicates"] + info["near_duplicates"] + \
            info.get("balanced_out", 0) == info["raw"]
        rows = [json.loads(line) for line in open(tmp_path / "run" / kind / "train.jsonl")]
        counts = collections.Counter(r["answer"] for r in rows)
        assert counts["yes"] == counts["no"]
    assert summary["rejects"]["yes_no"]["off_rule"] > 0
