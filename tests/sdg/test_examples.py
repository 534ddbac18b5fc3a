"""The hand-written example data keeps the DESIGN.md record schemas."""

import json
import os

from align_jax.data import documents
from align_jax.sdg import principles

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")


def _rows(name):
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _strings(row, fields):
    return all(isinstance(row[f], str) and row[f].strip() for f in fields)


def test_example_files_follow_schemas():
    words = len(documents.load_document(os.path.join(EXAMPLES, "values_document.md")).text.split())
    assert 1500 <= words <= 2500
    sft = _rows("sft.jsonl")
    assert len(sft) >= 40 and all(_strings(r, ("prompt", "completion")) for r in sft)
    pref = _rows("preference.jsonl")
    assert len(pref) >= 40
    assert all(_strings(r, ("prompt", "chosen", "rejected")) and r["chosen"] != r["rejected"]
               for r in pref)
    aligner = _rows("aligner.jsonl")
    assert len(aligner) >= 20 and {r["criterion"] for r in aligner} == {
        "ethical", "factuality", "helpful"}
    assert all(_strings(r, ("input", "initial_response", "critique", "aligned_response"))
               for r in aligner)
    inspector = _rows("inspector.jsonl")
    assert len(inspector) == 2 * len(aligner)
    for a, (bad, good) in zip(aligner, zip(inspector[::2], inspector[1::2])):
        assert (bad["label"], good["label"]) == (0, 1)
        assert bad["response"] == a["initial_response"]
        assert good["response"] == a["aligned_response"]
        assert bad["input"] == good["input"] == a["input"]
    for name in ("sft.jsonl", "preference.jsonl", "preference_heldout.jsonl"):
        prompts = [r["prompt"] for r in _rows(name)]
        assert len(set(prompts)) == len(prompts)


def test_held_out_example_sets_share_no_prompt_with_training_data():
    heldout = _rows("preference_heldout.jsonl")
    assert len(heldout) >= 40
    assert all(_strings(r, ("prompt", "chosen", "rejected")) and r["chosen"] != r["rejected"]
               for r in heldout)
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in _rows("preference.jsonl")}
    # Length cannot pass for alignment: the chosen answer is the shorter one in many pairs.
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in heldout)
    assert 0.4 <= shorter / len(heldout) <= 0.6
    squad = _rows("squad_heldout.jsonl")
    assert len(squad) >= 18 and all(_strings(r, ("input", "response")) for r in squad)
    assert not {r["input"] for r in squad} & {r["input"] for r in _rows("aligner.jsonl")}


def test_example_constitutions_are_all_combinations_of_the_principles():
    found = principles.load_principles(os.path.join(EXAMPLES, "principles.jsonl"))
    cons = _rows("constitutions.jsonl")
    assert cons == principles.make_constitutions(found)
    assert len(cons) == 2 ** len(found)
    for c in cons:
        assert set(c) >= {"id", "principles", "negated"}
        assert all(isinstance(n, bool) for n in c["negated"])
