"""Record sources: JSONL (good and bad input), Hugging Face datasets, tfds data_source."""

import json

import pytest

from align_jax.data import sources
from align_jax.data.sources import DataError, load_records, read_jsonl


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


PREF = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "meta": i}
        for i in range(3)]


def test_jsonl_records_keep_fields_and_file_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps(PREF[0]), "", json.dumps(PREF[1])])
    records = list(read_jsonl(path, schema="preference"))
    assert [r.data for r in records] == PREF[:2]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3"]


def test_not_json_line_raises_with_file_and_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps(PREF[0]), "{not json", json.dumps(PREF[1])])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        list(read_jsonl(path, schema="preference", on_error="raise"))


def test_bad_lines_skipped_and_reported(tmp_path):
    missing = {"prompt": "q", "rejected": "r"}
    wrong_type = {"prompt": "q", "chosen": 3, "rejected": "r"}
    path = _write(tmp_path / "p.jsonl", [json.dumps(PREF[0]), "{not json", json.dumps(missing),
                                         json.dumps(wrong_type), json.dumps(PREF[2])])
    records, report = load_records(path, schema="preference", on_error="skip")
    assert [r.data["meta"] for r in records] == [0, 2]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:5"]
    assert report.num_read == 2
    assert [s.where for s in report.skipped] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "not valid JSON" in report.skipped[0].reason
    assert "missing field 'chosen'" in report.skipped[1].reason
    assert "field 'chosen' must be" in report.skipped[2].reason
    assert f"{path}:3" in report.summary()


def test_invalid_utf8_and_non_object_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n[1, 2]\n')
    records, report = load_records(str(path), schema="text", on_error="skip")
    assert [r.where for r in records] == [f"{path}:1"]
    assert [(s.where, s.reason) for s in report.skipped] == [
        (f"{path}:2", "not valid UTF-8 (byte 10)"),
        (f"{path}:3", "expected a JSON object, got list")]


def test_missing_chosen_raises_naming_field(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "q", "rejected": "r"})])
    with pytest.raises(DataError, match=rf"{path}:1: missing field 'chosen'"):
        load_records(path, schema="preference")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{path}:0: empty file"):
        load_records(str(path), schema="text")
    records, report = load_records(str(path), schema="text", on_error="skip")
    assert records == [] and report.skipped[0].reason == "empty file (no records)"


def test_sft_accepts_messages_and_rejects_neither(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = _write(tmp_path / "s.jsonl", [json.dumps(good), json.dumps({"prompt": "only"})])
    with pytest.raises(DataError, match=r":2: missing field 'completion' or missing field "
                       r"'messages' \(sft schema\)"):
        load_records(path, schema="sft")
    records, _ = load_records(path, schema="sft", on_error="skip")
    assert records[0].data == good


def test_other_schemas():
    ok = {"constitution": {"id": "c1", "principles": ["be kind", "be brief"],
                           "negated": [False, True]},
          "kto": {"prompt": "q", "completion": "a", "label": True},
          "inspector": {"input": "x", "response": "y", "label": 1, "criterion": "ethical"},
          "aligner": {"input": "x", "initial_response": "y", "critique": "c",
                      "aligned_response": "y2", "criterion": "helpful"}}
    for schema, record in ok.items():
        assert sources.validate_record(record, schema=schema, where="w") == record
    with pytest.raises(DataError, match="w: fields 'principles' and 'negated' differ"):
        sources.validate_record({"id": 1, "principles": ["a"], "negated": []},
                                schema="constitution", where="w")
    with pytest.raises(DataError, match="field 'label' must be true/false or 0/1"):
        sources.validate_record({"prompt": "q", "completion": "a", "label": 2}, schema="kto",
                                where="w")


def test_directory_reads_every_jsonl_in_order(tmp_path):
    _write(tmp_path / "b.jsonl", [json.dumps({"text": "second"})])
    _write(tmp_path / "a.jsonl", [json.dumps({"text": "first"})])
    records, _ = load_records(str(tmp_path), schema="text")
    assert [r.data["text"] for r in records] == ["first", "second"]
    assert records[1].where.endswith("b.jsonl:1")


def test_hf_dataset_object_json_file_and_saved_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(PREF)
    from_object, _ = load_records(ds, schema="preference")
    path = _write(tmp_path / "p.jsonl", [json.dumps(r) for r in PREF])
    from_file, _ = load_records(f"hf:{path}", schema="preference")
    ds.save_to_disk(str(tmp_path / "saved"))
    from_dir, _ = load_records(f"hf:{tmp_path / 'saved'}", schema="preference")
    for records in (from_object, from_file, from_dir):
        assert [r.data for r in records] == PREF
    assert from_file[2].where.endswith("[train][2]")
    bad = datasets.Dataset.from_list([{"prompt": "q", "chosen": None, "rejected": "r"}])
    with pytest.raises(DataError, match=r"Dataset\[0\]: field 'chosen' must be"):
        load_records(bad, schema="preference")


def test_tfds_data_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyPrefs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"prompt": text, "chosen": text, "rejected": text}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, r in enumerate(PREF):
                yield i, {k: r[k] for k in ("prompt", "chosen", "rejected")}

    TinyPrefs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    records, _ = load_records("tfds:tiny_prefs", schema="preference", data_dir=str(tmp_path))
    got = sorted((r.data["prompt"], r.data["chosen"], r.data["rejected"]) for r in records)
    assert got == [(r["prompt"], r["chosen"], r["rejected"]) for r in PREF]
    assert records[0].where.startswith("tiny_prefs[train][")


def test_whitespace_texts_are_refused_or_skipped_with_file_line(tmp_path):
    from align_jax.data.sources import DataError, LoadReport, read_jsonl
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "Hi", "completion": "Hello"}\n'
                    '{"prompt": "  \\n ", "completion": "Hello"}\n'
                    '{"messages": [{"role": "user", "content": "Q"}, '
                    '{"role": "assistant", "content": "\\t"}]}\n')
    with pytest.raises(DataError, match=rf"{path}:2: field 'prompt' is empty or only whitespace"):
        list(read_jsonl(str(path), schema="sft"))
    report = LoadReport()
    kept = list(read_jsonl(str(path), schema="sft", on_error="skip", report=report))
    assert [r.where for r in kept] == [f"{path}:1"]
    assert [s.where for s in report.skipped] == [f"{path}:2", f"{path}:3"]
    assert "assistant" in report.skipped[1].reason


def test_generate_prompts_name_file_line_and_field(tmp_path):
    from align_jax.generate.entry import _read_prompts
    bad_type = tmp_path / "a.jsonl"
    bad_type.write_text('{"prompt": "ok"}\n{"prompt": 42}\n')
    with pytest.raises(ValueError, match=rf"{bad_type}:2: field 'prompt' must be a string"):
        _read_prompts(str(bad_type))
    latin1 = tmp_path / "b.jsonl"
    latin1.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{latin1}:2: not valid UTF-8"):
        _read_prompts(str(latin1))
    blank = tmp_path / "c.jsonl"
    blank.write_text('{"prompt": "   "}\n')
    with pytest.raises(ValueError, match=rf"{blank}:1: field 'prompt' is empty"):
        _read_prompts(str(blank))
