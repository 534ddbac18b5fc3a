"""Record sources: JSONL files, Hugging Face `datasets`, tfds `data_source`.

Every record is validated against one schema of DESIGN.md and carries where it came from
(`file:line` for JSONL, `name[split][index]` otherwise), so later stages (truncation, batching) can
name the exact example they cut or dropped. Bad input is either skipped and reported or stops the
run with a `DataError`, as the caller chose with `on_error`; loading happens before any training
step, so stopping never loses trained state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from align_jax.jsonl import JsonlError, decode_line, numbered_lines

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """Bad input; the message names the file (or dataset), the line (or index) and the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """One validated record.

    Attributes:
      data: the record's fields (extra metadata fields are kept).
      where: provenance, `path:line` (1-based) for JSONL or `name[split][index]` for datasets.
    """
    data: Mapping[str, Any]
    where: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Skipped:
    where: str
    reason: str


@dataclasses.dataclass(kw_only=True)
class LoadReport:
    """What a load read and what it skipped (and why)."""
    num_read: int = 0
    skipped: list[Skipped] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"read {self.num_read} records, skipped {len(self.skipped)}"]
        lines += [f"  {s.where}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# Field validators. A "text" field is a string; a "chat" field is a string or a list of
# {role, content} messages (the conversational form of the Hugging Face preference datasets).
def _is_text(v):
    return isinstance(v, str)


def _is_messages(v):
    return (isinstance(v, list) and bool(v) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in v))


def _is_chat(v):
    return _is_text(v) or _is_messages(v)


def _is_label(v):
    return isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))


def _is_str_list(v):
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _is_bool_list(v):
    return isinstance(v, list) and all(isinstance(s, bool) for s in v)


def _is_responses(v):
    return isinstance(v, list) and all(
        isinstance(s, str) or (isinstance(s, list) and all(isinstance(t, int) for t in s))
        for s in v)


_CHECKS = {
    "text": (_is_text, "a string"),
    "chat": (_is_chat, "a string or a non-empty list of {role, content} messages"),
    "messages": (_is_messages, "a non-empty list of {role, content} messages"),
    "label": (_is_label, "true/false or 0/1"),
    "str_list": (_is_str_list, "a list of strings"),
    "bool_list": (_is_bool_list, "a list of booleans"),
    "id": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a string or int"),
    "responses": (_is_responses, "a list of strings or of token-id lists"),
    "yes_no": (lambda v: isinstance(v, str) and v.strip().lower() in ("yes", "no"),
               '"yes" or "no"'),
}
# Checks whose message shows the bad value itself (a wrong word, not a wrong type).
_SHOW_VALUE = {"yes_no"}

# schema -> alternatives, each a dict field -> check; a record must match one alternative.
SCHEMAS: dict[str, tuple[dict[str, str], ...]] = {
    "text": ({"text": "text"},),
    # Queries alone (SAMI, evaluation): any record with a prompt, e.g. an SFT file.
    "query": ({"prompt": "text"},),
    "sft": ({"prompt": "chat", "completion": "chat"}, {"messages": "messages"}),
    "preference": ({"prompt": "chat", "chosen": "chat", "rejected": "chat"},),
    "kto": ({"prompt": "chat", "completion": "chat", "label": "label"},),
    "aligner": ({"input": "text", "initial_response": "text", "critique": "text",
                 "aligned_response": "text", "criterion": "text"},),
    "inspector": ({"input": "text", "response": "text", "label": "label", "criterion": "text"},),
    "constitution": ({"id": "id", "principles": "str_list", "negated": "bool_list"},),
    # In-memory SAMI examples: one query, C constitution texts, C responses (text or token ids),
    # response j sampled under constitution j.
    "sami": ({"prompt": "text", "constitutions": "str_list", "responses": "responses"},),
    # Yes/no held-out questions (answer correctness read from a generated answer's opening);
    # optional `pair_id` (minimal pairs whose answers flip) and `section` ride along.
    "yes_no": ({"question": "text", "answer": "yes_no"},),
}


def validate_record(data: Any, *, schema: str | tuple[Mapping[str, str], ...],
                    where: str) -> dict:
    """Checks one record against a schema.

    Args:
      data: the decoded record.
      schema: a key of SCHEMAS, or alternatives of the same form (an objective's own schema,
        e.g. `DataFormat.schema`).
      where: provenance used in the error message.
    Returns:
      The record as a dict.
    Raises:
      DataError naming `where` and the missing or mistyped field.
    """
    if isinstance(schema, str):
        if schema not in SCHEMAS:
            raise ValueError(f"unknown schema {schema!r}; expected one of {sorted(SCHEMAS)}")
        alternatives, schema_name = SCHEMAS[schema], schema
    else:
        alternatives, schema_name = tuple(schema), "given"
        for alternative in alternatives:
            for field, check in alternative.items():
                if check not in _CHECKS:
                    raise ValueError(f"schema field {field!r}: unknown check {check!r}; "
                                     f"expected one of {sorted(_CHECKS)}")
    if not isinstance(data, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    errors = []
    for alternative in alternatives:
        problems = []
        for field, check in alternative.items():
            if field not in data:
                problems.append(f"missing field {field!r}")
            elif not _CHECKS[check][0](data[field]):
                value = data[field]
                got = (repr(value) if check in _SHOW_VALUE and isinstance(value, str)
                       else type(value).__name__)
                problems.append(f"field {field!r} must be {_CHECKS[check][1]}, got {got}")
        if not problems:
            problems = _blank_texts(data, alternative)
        if not problems:
            break
        errors.append("; ".join(problems))
    else:
        raise DataError(f"{where}: {' or '.join(errors)} ({schema_name} schema)")
    if schema == "constitution" and len(data["principles"]) != len(data["negated"]):
        raise DataError(f"{where}: fields 'principles' and 'negated' differ in length "
                        "(constitution schema)")
    if schema == "sami" and len(data["constitutions"]) != len(data["responses"]):
        raise DataError(f"{where}: fields 'constitutions' and 'responses' differ in length "
                        "(sami schema)")
    return dict(data)


def _blank_texts(data: Mapping, alternative: Mapping[str, str]) -> list[str]:
    """Text fields (and chat turns other than system) that are empty or only whitespace."""
    out = []
    for field, check in alternative.items():
        value = data[field]
        if check in ("text", "chat") and isinstance(value, str) and not value.strip():
            out.append(f"field {field!r} is empty or only whitespace")
        elif check in ("chat", "messages") and isinstance(value, list):
            for i, m in enumerate(value):
                if m.get("role") != "system" and not m["content"].strip():
                    out.append(f"field {field!r}[{i}] ({m['role']}) is empty or only whitespace")
                    break
    return out


def _handle(error: DataError, *, on_error: str, report: LoadReport) -> None:
    if on_error == "raise":
        raise error
    where, _, reason = str(error).partition(": ")
    report.skipped.append(Skipped(where=where, reason=reason))


def _check_on_error(on_error):
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def read_jsonl(path: str, *, schema: str, on_error: str = "raise",
               report: LoadReport | None = None) -> Iterator[Record]:
    """Reads a JSONL file, one record a line; blank lines are ignored.

    Args:
      path: the file.
      schema: a key of SCHEMAS.
      on_error: "raise" stops at the first bad line (or an empty file) with a DataError naming file,
        line and field; "skip" skips it and appends the reason to `report`.
      report: collects counts and skipped lines (a new one when None).
    Returns:
      An iterator of Records with `where = "path:line"`.
    """
    _check_on_error(on_error)
    report = LoadReport() if report is None else report
    num_records = 0
    for line_no, raw in numbered_lines(path):
        where = f"{path}:{line_no}"
        try:
            try:
                data = decode_line(raw, where=where)
            except JsonlError as e:
                raise DataError(str(e)) from None
            record = Record(data=validate_record(data, schema=schema, where=where), where=where)
        except DataError as e:
            _handle(e, on_error=on_error, report=report)
            continue
        num_records += 1
        report.num_read += 1
        yield record
    if num_records == 0 and not any(s.where.startswith(f"{path}:") for s in report.skipped):
        _handle(DataError(f"{path}:0: empty file (no records)"), on_error=on_error, report=report)


def _plain(value):
    """tfds/numpy values -> Python: bytes -> str, arrays -> lists, numpy scalars -> items."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_rows(rows: Iterable[Any], *, name: str, schema: str, on_error: str = "raise",
              report: LoadReport | None = None) -> Iterator[Record]:
    """Validates rows of any indexable dataset (HF Dataset, tfds data source, a list of dicts).

    Args:
      rows: the rows, in order.
      name: the dataset's name for provenance (`name[index]`).
      schema, on_error, report: as in read_jsonl.
    Returns:
      An iterator of Records.
    """
    _check_on_error(on_error)
    report = LoadReport() if report is None else report
    count, skipped_before = 0, len(report.skipped)
    for index, row in enumerate(rows):
        where = f"{name}[{index}]"
        try:
            data = validate_record(_plain(row), schema=schema, where=where)
            record = Record(data=data, where=where)
        except DataError as e:
            _handle(e, on_error=on_error, report=report)
            continue
        count += 1
        report.num_read += 1
        yield record
    if count == 0 and len(report.skipped) == skipped_before:
        _handle(DataError(f"{name}: empty dataset (no records)"), on_error=on_error, report=report)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HfSpec:
    """A parsed `hf:name[:config[:split]]` spec (an empty part is the default)."""
    name: str
    config: str | None = None
    split: str | None = None


def parse_hf_spec(spec: str) -> HfSpec:
    """`hf:<name>[:<config>[:<split>]]` -> HfSpec; a local path that exists as written (colons
    and all) is the name alone.

    Args:
      spec: the data spec, with its "hf:" prefix.
    Returns:
      The HfSpec.
    Raises:
      DataError naming the spec when it has more than three parts or no name.
    """
    rest = spec.removeprefix("hf:")
    if os.path.exists(rest):
        return HfSpec(name=rest)
    parts = rest.split(":")
    if len(parts) > 3 or not parts[0]:
        raise DataError(f"data={spec!r}: expected hf:<name>[:<config>[:<split>]] (a dataset "
                        "name, data file or folder, then optionally its config and split)")
    parts += [""] * (3 - len(parts))
    return HfSpec(name=parts[0], config=parts[1] or None, split=parts[2] or None)


def _hf_dataset(spec: str, split: str | None, config: str | None = None):
    import datasets  # heavy, optional: only Hugging Face dataset sources

    data_files_ext = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    ext = os.path.splitext(spec)[1].lower()
    saved = os.path.isdir(spec) and (os.path.exists(os.path.join(spec, "dataset_info.json"))
                                     or os.path.exists(os.path.join(spec, "dataset_dict.json")))
    if config is not None and (saved or os.path.isfile(spec)):
        raise DataError(f"{spec}: a data file or saved dataset has no config (got {config!r}); "
                        "configs belong to hub datasets and dataset folders")
    if os.path.isfile(spec) and ext in data_files_ext:
        return datasets.load_dataset(data_files_ext[ext], data_files=spec, split=split or "train")
    if saved:
        loaded = datasets.load_from_disk(spec)
    else:
        loaded = datasets.load_dataset(spec, config, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise DataError(f"{spec}: no split {split!r}; splits are {sorted(loaded)}")
        loaded = loaded[split]
    return loaded


def mixture_parts(data: Any) -> list[tuple[Any, float]] | None:
    """The (spec, weight) parts of a data mixture, or None when `data` is one spec.

    Args:
      data: `[(spec, weight), ...]` (gin: `data = [("a.jsonl", 0.7), ("hf:org/x", 0.3)]`), or
        on the command line the string `"a.jsonl@0.7,hf:org/x@0.3"`; anything else (a path
        that exists, a spec without "@", a list of records) is one spec.
    Returns:
      The parts with float weights, or None.
    Raises:
      DataError naming the part whose weight is not a positive number.
    """
    if isinstance(data, str):
        if os.path.exists(data) or "@" not in data:
            return None
        parts = []
        for item in data.split(","):
            spec, _, weight = item.strip().rpartition("@")
            if not spec:
                raise DataError(f"data={data!r}: mixture part {item.strip()!r} is not "
                                "<spec>@<weight>")
            parts.append((spec, weight))
    elif (isinstance(data, (list, tuple)) and data
          and all(isinstance(p, (list, tuple)) and len(p) == 2
                  and isinstance(p[0], (str, os.PathLike)) for p in data)):
        parts = [tuple(p) for p in data]
    else:
        return None
    out = []
    for spec, weight in parts:
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = float("nan")
        if isinstance(weight, bool) or not 0 < value < float("inf"):
            raise DataError(f"data: the weight of {os.fspath(spec)!r} must be a positive "
                            f"number, got {weight!r}")
        out.append((os.fspath(spec), value))
    return out


def load_records(spec: Any, *, schema: str, on_error: str = "raise", split: str | None = None,
                 data_dir: str | None = None) -> tuple[list[Record], LoadReport]:
    """The one front door for records.

    Args:
      spec: a `.jsonl` path; a directory (every `*.jsonl` in it, sorted, or a `save_to_disk`
        dataset); `"hf:<name, data file or dir>[:<config>[:<split>]]"` (`parse_hf_spec`);
        `"tfds:<name>"`; a loaded `datasets.Dataset`; or a list of dicts / Records.
      schema: a key of SCHEMAS.
      on_error: "raise" or "skip" (see read_jsonl).
      split: dataset split for hf/tfds (default "train"; an hf spec may name it instead).
      data_dir: tfds data directory.
    Returns:
      (records, report).
    """
    _check_on_error(on_error)
    report = LoadReport()
    if isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        if spec.startswith("hf:"):
            hf = parse_hf_spec(spec)
            if hf.split is not None and split is not None and hf.split != split:
                raise DataError(f"data={spec!r} names split {hf.split!r} but split={split!r}")
            split = hf.split or split
            rows = _hf_dataset(hf.name, split, hf.config)
            name = hf.name if hf.config is None else f"{hf.name}:{hf.config}"
            records = list(read_rows(rows, name=f"{name}[{split or 'train'}]", schema=schema,
                                     on_error=on_error, report=report))
        elif spec.startswith("tfds:"):
            import tensorflow_datasets as tfds  # heavy, optional: only tfds: sources
            name = spec[5:]
            source = tfds.data_source(name, split=split or "train", data_dir=data_dir)
            rows = (source[i] for i in range(len(source)))
            records = list(read_rows(rows, name=f"{name}[{split or 'train'}]", schema=schema,
                                     on_error=on_error, report=report))
        elif os.path.isdir(spec) and not any(n.endswith(".jsonl") for n in os.listdir(spec)):
            rows = _hf_dataset(spec, split)
            records = list(read_rows(rows, name=spec, schema=schema, on_error=on_error,
                                     report=report))
        elif os.path.isdir(spec):
            records = []
            for name in sorted(n for n in os.listdir(spec) if n.endswith(".jsonl")):
                records += read_jsonl(os.path.join(spec, name), schema=schema, on_error=on_error,
                                      report=report)
        elif os.path.isfile(spec):
            records = list(read_jsonl(spec, schema=schema, on_error=on_error, report=report))
        else:
            raise FileNotFoundError(f"{spec}: no such file or directory")
    elif isinstance(spec, Sequence) and spec and all(isinstance(r, Record) for r in spec):
        records = [Record(data=validate_record(r.data, schema=schema, where=r.where), where=r.where)
                   for r in spec]
        report.num_read = len(records)
    else:
        name = type(spec).__name__ if not isinstance(spec, list) else "records"
        records = list(read_rows(spec, name=name, schema=schema, on_error=on_error, report=report))
    return records, report
