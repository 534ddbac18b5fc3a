"""JSONL, read and written in one place: one JSON value per line, UTF-8, blank lines skipped.

`read_jsonl` / `iter_jsonl` give the objects of a file and stop at the first bad line with a
`JsonlError` (a ValueError) naming `file:line`. `write_jsonl` replaces a file atomically;
`append_jsonl` adds lines to an append-only stream and fsyncs them. Readers that must tolerate a
torn last line (the crash-safe SDG store, the metrics log) or that skip bad lines keep that policy
themselves and use `numbered_lines`, `decode_line` and `encode_line` from here.
"""

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from align_jax.atomic import atomic_write


class JsonlError(ValueError):
    """A JSONL line that is not UTF-8, not JSON (or nested past Python's recursion limit), or not
    an object; the message names file:line."""


def encode_line(row: Any) -> str:
    """One JSONL line (with its newline) for `row`; non-ASCII text is kept as is."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def decode_line(raw: bytes | str, *, where: str) -> Any:
    """The JSON value of one line; a JsonlError `"<where>: not valid UTF-8/JSON ..."` otherwise."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonlError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(raw.rstrip("\r\n"))  # without the line end, columns stay on this line
    except json.JSONDecodeError as e:
        raise JsonlError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise JsonlError(f"{where}: JSON nested too deeply to read") from None


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each non-blank line of `path`."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                yield line_no, raw


def iter_values(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """("file:line", JSON value) of each non-blank line; stops at a bad line with a JsonlError."""
    path = os.fspath(path)
    for line_no, raw in numbered_lines(path):
        where = f"{path}:{line_no}"
        yield where, decode_line(raw, where=where)


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The objects of a JSONL file, in order; a line that is not an object is a JsonlError."""
    for where, value in iter_values(path):
        if not isinstance(value, dict):
            raise JsonlError(f"{where}: expected a JSON object, got {type(value).__name__}")
        yield value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All objects of a JSONL file (see `iter_jsonl`)."""
    return list(iter_jsonl(path))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> str:
    """Replaces `path` by `rows` as JSONL, atomically (temp file, fsync, rename); returns path."""
    path = os.fspath(path)
    atomic_write(path, "".join(encode_line(row) for row in rows))
    _fsync_dir(os.path.dirname(path))
    return path


def append_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Appends `rows` to `path` in one write and fsyncs, so a crash tears at most the last line."""
    append_lines(path, [encode_line(row) for row in rows])


def append_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """`append_jsonl` of lines already made by `encode_line` (each ending in a newline)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    """Makes a rename inside `path` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
