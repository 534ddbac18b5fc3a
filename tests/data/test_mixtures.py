"""Data mixtures drawn by weight, and `hf:name:config:split` specs from a local folder."""

import json
import math

import numpy as np
import pytest
from data_char_tokenizer import CharTokenizer, chars

from align_jax.data import make_loader
from align_jax.data.sources import DataError, load_records, mixture_parts, parse_hf_spec

TOK = CharTokenizer()
A_ID, B_ID = chars("A")[0], chars("B")[0]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def two_sources(tmp_path):
    # Source A holds 5 records, B 40: weights, not sizes, must set the rates.
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"A{i}", "completion": "x"} for i in range(5)])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": f"B{i}", "completion": "y" * (1 + i % 3)}
                                      for i in range(40)])
    return a, b


def _sources_of(batch):
    """Per real row: 'A' or 'B' (the prompt's first letter, after <s><|user|>)."""
    first = batch["tokens"][:, 2]
    return ["A" if t == A_ID else "B" for t in first[batch["segment_ids"][:, 0] > 0]]


def _loader(data, **kw):
    return make_loader(data, kind="sft", tokenizer=TOK, seq_len=16, batch_size=8,
                       num_epochs=None, **kw)


def test_proportions_match_the_weights(two_sources):
    a, b = two_sources
    loader = _loader([(a, 3.0), (b, 1.0)])
    per_batch = [_sources_of(next(loader)).count("A") for _ in range(150)]
    n, p = 8 * len(per_batch), 0.75
    # Four binomial standard deviations: a weighted draw of n rows falls outside with
    # probability ~6e-5 (grain scales 3:1 to 300:100, exactly 0.75).
    assert abs(sum(per_batch) - n * p) <= 4 * math.sqrt(n * p * (1 - p)), sum(per_batch)
    # Drawn in random order, not a fixed pattern: the count per batch varies.
    assert len(set(per_batch)) > 1


def test_mixture_string_form_resume_and_one_part(two_sources):
    a, b = two_sources
    first = [next(_loader([(a, 1), (b, 2)], seed=3)) for _ in range(1)]
    assert mixture_parts(f"{a}@1, {b}@2") == [(a, 1.0), (b, 2.0)]
    by_string = _loader(f"{a}@1,{b}@2", seed=3)
    assert np.array_equal(next(by_string)["tokens"], first[0]["tokens"])
    state = by_string.get_state()
    expect = [next(by_string)["tokens"] for _ in range(7)]
    again = _loader(f"{a}@1,{b}@2", seed=3)
    again.set_state(state)
    assert all(np.array_equal(next(again)["tokens"], t) for t in expect)
    # One part is the plain spec: the same batches.
    one, plain = _loader([(b, 5.0)]), _loader(b)
    for _ in range(6):
        x, y = next(one), next(plain)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_one_epoch_holds_as_many_draws_as_the_sources(two_sources):
    a, b = two_sources
    loader = make_loader([(a, 1.0), (b, 1.0)], kind="sft", tokenizer=TOK, seq_len=16,
                         batch_size=5, num_epochs=1, drop_remainder=False)
    rows = [s for batch in loader for s in _sources_of(batch)]
    assert len(rows) == 45 and loader.num_examples == 45
    # Equal weights: half the draws from the 5 records of A (each repeated), half from B.
    assert abs(rows.count("A") - 22.5) <= 1


def test_each_source_keeps_its_own_checks(two_sources, tmp_path):
    a, _ = two_sources
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "c"}, {"prompt": "q"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'completion'"):
        _loader([(a, 1.0), (bad, 1.0)])
    loader = _loader([(a, 1.0), (bad, 1.0)], on_error="skip")
    assert loader.load_report.num_read == 6 and len(loader.load_report.skipped) == 1
    for data, field in (([(a, 0.0), (bad, 1.0)], "0.0"), (f"{a}@x,{bad}@1", "'x'")):
        with pytest.raises(DataError, match=f"the weight of .*a.jsonl' must be a positive "
                                            f"number, got {field}"):
            _loader(data)
    with pytest.raises(DataError, match="mixture part '@2' is not <spec>@<weight>"):
        mixture_parts(f"{a}@1,@2")


def _dataset_folder(root):
    """A script-free dataset folder: two configs declared in its README, jsonl per split."""
    for config, split, rows in (("chat", "train", [{"prompt": "p0", "completion": "c0"}]),
                                ("chat", "test", [{"prompt": "t0", "completion": "u0"},
                                                  {"prompt": "t1", "completion": "u1"}]),
                                ("plain", "train", [{"text": "hello"}])):
        (root / config).mkdir(parents=True, exist_ok=True)
        _jsonl(root / config / f"{split}.jsonl", rows)
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: chat\n  data_files:\n"
        "  - split: train\n    path: chat/train.jsonl\n"
        "  - split: test\n    path: chat/test.jsonl\n"
        "- config_name: plain\n  data_files:\n"
        "  - split: train\n    path: plain/train.jsonl\n---\n", encoding="utf-8")
    return str(root)


def test_hf_name_config_split_from_a_local_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = _dataset_folder(tmp_path / "ds")
    test, _ = load_records(f"hf:{folder}:chat:test", schema="sft")
    assert [r.data["prompt"] for r in test] == ["t0", "t1"]
    assert test[1].where == f"{folder}:chat[test][1]"
    plain, _ = load_records(f"hf:{folder}:plain", schema="text")
    assert [r.data for r in plain] == [{"text": "hello"}]
    assert parse_hf_spec("hf:org/name::validation").split == "validation"
    assert parse_hf_spec(f"hf:{folder}").name == folder
    with pytest.raises(DataError, match="expected hf:<name>"):
        parse_hf_spec("hf:a:b:c:d")
    with pytest.raises(DataError, match="names split 'test' but split='train'"):
        load_records(f"hf:{folder}:chat:test", schema="sft", split="train")
    saved = _jsonl(tmp_path / "f.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="f.jsonl: a data file or saved dataset has no config"):
        load_records(f"hf:{saved}:cfg", schema="text")
    # A mixture of an hf config and a jsonl file, in the command-line form.
    sft = _jsonl(tmp_path / "s.jsonl", [{"prompt": "A", "completion": "z"}] * 3)
    loader = make_loader(f"hf:{folder}:chat:test@1,{sft}@1", kind="sft", tokenizer=TOK,
                         seq_len=16, batch_size=5, num_epochs=1, drop_remainder=False)
    rows = [s for batch in loader for s in _sources_of(batch)]
    assert len(rows) == 5 and loader.load_report.num_read == 5
