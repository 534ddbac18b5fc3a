"""align_jax.jsonl: the one JSONL reader/writer."""

import json
import os

import pytest

from align_jax import jsonl


def test_write_then_read_round_trips_and_keeps_unicode(tmp_path):
    rows = [{"a": 1, "t": "héllo ✓"}, {"b": [1, 2], "c": None}]
    path = jsonl.write_jsonl(tmp_path / "sub" / "x.jsonl", rows)
    text = open(path, encoding="utf-8").read()
    assert text == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert jsonl.read_jsonl(path) == rows
    assert list(jsonl.iter_jsonl(path)) == rows
    assert not [n for n in os.listdir(tmp_path / "sub") if n != "x.jsonl"]  # no temp file left


def test_blank_lines_are_skipped_and_append_adds(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    jsonl.append_jsonl(path, [{"a": 3}])
    assert [r["a"] for r in jsonl.read_jsonl(path)] == [1, 2, 3]


@pytest.mark.parametrize("data,why", [
    (b'{"a": 1}\n{"a": \n', r"x.jsonl:2: not valid JSON \(.* at column 7\)"),
    (b'{"a": 1}\n\n{"a": "\xe9"}\n', r"x.jsonl:3: not valid UTF-8 \(byte 7\)"),
    (b'{"a": 1}\n[1, 2]\n', r"x.jsonl:2: expected a JSON object, got list"),
    # Deeper than Python's recursion limit: json raises RecursionError, not a ValueError.
    (b'{"a": 1}\n{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     r"x.jsonl:2: JSON nested too deeply to read"),
])
def test_bad_lines_name_file_and_line(tmp_path, data, why):
    path = tmp_path / "x.jsonl"
    path.write_bytes(data)
    with pytest.raises(jsonl.JsonlError, match=why):
        jsonl.read_jsonl(path)
    assert issubclass(jsonl.JsonlError, ValueError)


def test_line_codec_round_trips():
    row = {"k": "ü", "n": 1.5}
    line = jsonl.encode_line(row)
    assert line.endswith("\n") and line.count("\n") == 1
    assert jsonl.decode_line(line.encode("utf-8"), where="w") == row
    assert jsonl.decode_line(line, where="w") == row
