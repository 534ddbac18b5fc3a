"""The recipe's data sources: which records train, which are held out, what leaks are dropped."""

import json

import pytest

from align_jax.methods import value_data


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_drop_leaks_removes_exact_and_near_repeats_of_held_out_questions():
    train = [{"prompt": "Can I accept a 50-euro voucher from a member after a repair?"},
             {"prompt": "can I  accept a 50-euro voucher from a member after a repair?"},
             {"prompt": "Can I accept a 50-euro voucher from a member after a repair today?"},
             {"prompt": "Do I have to log my hours as I worked them?"}]
    kept, dropped = value_data.drop_leaks(
        train, ["Can I accept a 50-euro voucher from a member after a repair?"])
    # Exact (case and spacing aside) and near (bigram Jaccard >= 0.8) repeats go.
    assert [r["prompt"] for r in kept] == ["Do I have to log my hours as I worked them?"]
    assert dropped == 3
    assert value_data.drop_leaks(train, []) == (train, 0)


def test_gather_from_files_with_held_out_files_and_provenance(tmp_path):
    sft = [{"prompt": f"Question {i} about the roof rule?", "completion": "No."}
           for i in range(6)]
    pref = [{"prompt": f"Pair {i} about gifts?", "chosen": "No.", "rejected": "Yes."}
            for i in range(5)]
    held_pref = [{"prompt": "Pair 0 about gifts?", "chosen": "No.", "rejected": "Yes."}]
    data = value_data.gather(
        str(tmp_path), document="unused.md", teacher=None, tokenizer=None, sdg_kwargs={},
        teacher_kwargs=None, sft_data=_write(tmp_path / "sft.jsonl", sft),
        preference_data=_write(tmp_path / "pref.jsonl", pref), train_on=None,
        sft_test=None, preference_test=_write(tmp_path / "held.jsonl", held_pref),
        heldout_fraction=0.5, heldout_questions=["Question 3 about the roof rule?"])
    # Split by prompt, never both sides; the yes/no question and the held-out pair leak.
    train_prompts = {r["prompt"] for r in data.sft_train}
    assert not train_prompts & {r["prompt"] for r in data.sft_test}
    assert "Question 3 about the roof rule?" not in train_prompts
    assert "Pair 0 about gifts?" not in {r["prompt"] for r in data.pref_train}
    assert len(data.pref_train) == 4 and data.pref_test == held_pref
    assert data.leaks_dropped >= 1
    assert all("_from" not in r for r in data.sft_train + data.pref_train)
    sets = {(p["set"], p["source"]): p["records"] for p in data.provenance}
    assert sets[("preference train", f"file {tmp_path / 'pref.jsonl'}")] == 4
    assert sets[("preference held out", f"file {tmp_path / 'held.jsonl'}")] == 1
    lines = "\n".join(value_data.provenance_lines(data))
    assert "## Training data" in lines and "held out" in lines


@pytest.mark.parametrize("train_on, teacher, message", [
    (("sdg",), None, "no `teacher`"),
    (("files",), None, "neither `sft_data`"),
    (("web",), None, "subset of"),
])
def test_gather_refuses_sources_it_cannot_have(tmp_path, train_on, teacher, message):
    with pytest.raises(ValueError, match=message):
        value_data.gather(str(tmp_path), document="d.md", teacher=teacher, tokenizer=None,
                          sdg_kwargs={}, teacher_kwargs=None, sft_data=None,
                          preference_data=None, train_on=train_on, sft_test=None,
                          preference_test=None, heldout_fraction=0.2)
