"""The learning curve (`make demo-curve`) on a tiny model with a scripted teacher."""

import csv
import json
import pathlib
import sys

import jax
import pytest

from align_jax.methods import value_curve, value_data

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "sdg"))
from scripted_teacher import ScriptedTeacher  # noqa: E402

DOC = """## Safety

Never work on a roof alone. Report every near miss within the same working day.

## Gifts

Small gifts may be accepted and shared with the team. Do not accept cash from a supplier.
"""

QUESTIONS = [{"question": "May I go up on a roof alone for a short job?", "answer": "no"},
             {"question": "Must I report a near miss today?", "answer": "yes"},
             {"question": "Can I take cash from a supplier?", "answer": "no"},
             {"question": "May I share a small gift with the team?", "answer": "yes"}]


class _NoCalls(ScriptedTeacher):
    """Counts tokens (chunking) but must write nothing."""

    def chat(self, *args, **kwargs):
        raise AssertionError("the teacher was asked although SDG was copied in")

    complete = chat


@pytest.fixture
def tiny_model(tmp_path):
    from align_jax.models.config import get_config
    from align_jax.models.hf import save_hf
    from align_jax.models.transformer import init_params
    from align_jax.tokenizer import load_tokenizer
    from align_jax.tokenizer_training import train_tokenizer
    path = tmp_path / "tiny"
    train_tokenizer(DOC.splitlines() * 4 + [q["question"] for q in QUESTIONS] * 4, path,
                    vocab_size=300)
    tok = load_tokenizer(str(path))
    cfg = get_config("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_hf(cfg, init_params(cfg, jax.random.key(0)), str(path))
    return str(path)


def test_curve_points_and_reused_sdg(tmp_path, tiny_model, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    test = tmp_path / "yes_no.jsonl"
    test.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    sdg_kwargs = {"stages": ["yes_no"], "rounds": 2, "chunk_tokens": 64, "overlap": 0,
                  "progress": False, "verbose": False}
    args = dict(document=str(doc), init_from=tiny_model, teacher="local:scripted",
                yes_no_test=str(test), shares=(0.5, 1.0), steps=(1, 2), seq_len=128,
                batch_size=8, yes_no_max_new_tokens=3)
    monkeypatch.setattr(value_data, "make_teacher", lambda *a, **k: ScriptedTeacher())
    # min_cosine=None: the scripted questions are not worth an encoder here.
    from align_jax.sdg import yes_no
    sdg_kwargs["yes_no_config"] = yes_no.YesNoConfig(min_cosine=None, questions_per_rule=4)
    first = value_curve.value_curve(output_dir=str(tmp_path / "a"), sdg_kwargs=sdg_kwargs,
                                    **args)
    pts = first["points"]
    # The base model, then every (share, steps) in order, each with an interval.
    assert [(p["share"], p["steps"]) for p in pts] == [
        (0.0, 0), (0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)]
    assert first["constant"] == 0.5
    for p in pts:
        assert 0 <= p["ci_low"] <= p["accuracy"] <= p["ci_high"] <= 1
    assert pts[1]["records"] < pts[3]["records"]
    rows = list(csv.DictReader(open(tmp_path / "a" / "curve.csv")))
    assert len(rows) == len(pts) and (tmp_path / "a" / "curve.png").exists()
    # Each share is balanced: as many "yes" as "no" answers.
    for share in ("0.5", "1"):
        answers = [json.loads(x)["answer"]
                   for x in open(tmp_path / "a" / "data" / f"sft_{share}.jsonl")]
        assert answers.count("yes") == answers.count("no") > 0

    # A finished SDG folder is copied in and resumed: the teacher is never asked again.
    monkeypatch.setattr(value_data, "make_teacher", lambda *a, **k: _NoCalls())
    second = value_curve.value_curve(output_dir=str(tmp_path / "b"), sdg_kwargs=sdg_kwargs,
                                     sdg_from=str(tmp_path / "a" / "sdg"), **args)
    assert [p["records"] for p in second["points"]] == [p["records"] for p in pts]
    assert (open(tmp_path / "b" / "data" / "sft_1.jsonl").read()
            == open(tmp_path / "a" / "data" / "sft_1.jsonl").read())
    # Other SDG settings are refused with the difference named; a folder without SDG too.
    with pytest.raises(ValueError, match="different settings.*rounds"):
        value_curve.value_curve(output_dir=str(tmp_path / "c"),
                                sdg_kwargs={**sdg_kwargs, "rounds": 3},
                                sdg_from=str(tmp_path / "a" / "sdg"), **args)
    with pytest.raises(ValueError, match="holds no SDG run"):
        value_curve.value_curve(output_dir=str(tmp_path / "d"), sdg_kwargs=sdg_kwargs,
                                sdg_from=str(tmp_path), **args)
