"""SAMI principles and constitutions.

A principle writer (any Teacher, run greedily) turns a task and N principle names into
N principles, each with a definition and an antithesis. A constitution picks, for every
principle, either its definition or its antithesis; all 2^N picks are enumerated, the
all-definitions one first. Users may also supply principles themselves.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence

from align_jax.jsonl import iter_values
from align_jax.sdg import parsing
from align_jax.sdg.teacher import Teacher, ask
from align_jax.sdg.templates import Template, resolve_templates

TEMPLATES = {"principle_writer": "principle_writer"}
MAX_PRINCIPLES = 10  # 2^10 constitutions is already far more than SAMI samples per query


def _principle(name: str, definition: str, antithesis: str, *, where: str) -> dict:
    for field, value in (("name", name), ("definition", definition), ("antithesis", antithesis)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: field {field!r} must be a non-empty string")
    return {"name": name.strip(), "definition": definition.strip(),
            "antithesis": antithesis.strip()}


def write_principles(teacher: Teacher, *, task: str, principles: Sequence[str] | int,
                     seed: int = 0, max_tokens: int = 1024, use_chat: bool = True,
                     templates: Mapping[str, str | Template] | None = None
                     ) -> tuple[list[dict], list[dict]]:
    """Ask the principle writer for principles with definitions and antitheses.

    Args:
      teacher: the principle writer.
      task: what the aligned model does, e.g. "summarising forum posts".
      principles: the wanted principle names (e.g. ["helpful", "harmless"]) or how many
        the writer should choose.
      seed: sampling seed (decoding is greedy; the seed only matters to odd backends).
      max_tokens: generation budget.
      use_chat: chat or raw completion.
      templates: override for "principle_writer".
    Returns:
      (principles as {name, definition, antithesis}, rejects).
    Raises:
      ValueError if fewer principles than asked for could be parsed.
    """
    tpl = resolve_templates(TEMPLATES, templates)["principle_writer"].require(["task"])
    if isinstance(principles, int):
        n, wanted = principles, "choose the ones you consider most important for this task"
    else:
        n, wanted = len(principles), ", ".join(principles)
    if not 1 <= n <= MAX_PRINCIPLES:
        raise ValueError(f"number of principles must be in [1, {MAX_PRINCIPLES}], got {n}")
    (out,) = ask(teacher, [tpl.render(task=task, n=n, principles=wanted)], use_chat=use_chat,
                 temperature=0.0, max_tokens=max_tokens, seed=seed)
    items, rejects = parsing.parse_json_records(
        out, required=("principle", "definition", "antithesis"))
    found = []
    for item in items:
        problem = next((p for p in (parsing.text_problem(item[f], echoes=tpl.example_values)
                                    for f in item) if p), None)
        if problem:
            rejects.append({"reason": problem, "text": json.dumps(item)[:200]})
        else:
            found.append({"name": item["principle"], "definition": item["definition"],
                          "antithesis": item["antithesis"]})
    if len(found) < n:
        raise ValueError(
            f"principle writer gave {len(found)} usable principles, {n} wanted; rejects: "
            f"{[r['reason'] for r in rejects]}; output starts: {out.strip()[:80]!r}")
    return found[:n], rejects


def load_principles(path: str | os.PathLike) -> list[dict]:
    """User-written principles from a JSON list or JSONL file.

    Each entry: {"name" (or "principle"), "definition", "antithesis"}.

    Args:
      path: the file.
    Returns:
      Principles as {name, definition, antithesis}.
    Raises:
      ValueError naming the file, line (JSONL) and field for malformed entries.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    entries: list[tuple[str, object]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply to read") from None
        entries = [(f"{path}: entry {i}", d) for i, d in enumerate(data)]
    else:
        entries = list(iter_values(path))
    out = []
    for where, d in entries:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object")
        out.append(_principle(d.get("name", d.get("principle")), d.get("definition"),
                              d.get("antithesis"), where=where))
    if not out:
        raise ValueError(f"{path}: no principles")
    return out


def make_constitutions(principles: Sequence[Mapping[str, str]]) -> list[dict]:
    """Every combination of principle-or-antithesis, as SAMI constitution records.

    Args:
      principles: {name, definition, antithesis} each (from `write_principles` or
        `load_principles`).
    Returns:
      2^N records {"id", "principles": [text per principle], "negated": [bool per
      principle], "names": [name per principle]}; id "c" + one digit per principle
      (0 definition, 1 antithesis), so "c00..0" (nothing negated) comes first.
    """
    n = len(principles)
    if not 1 <= n <= MAX_PRINCIPLES:
        raise ValueError(f"number of principles must be in [1, {MAX_PRINCIPLES}], got {n}")
    checked = [_principle(p.get("name", p.get("principle")), p.get("definition"),
                          p.get("antithesis"), where=f"principle {i}")
               for i, p in enumerate(principles)]
    out = []
    for negated in itertools.product((False, True), repeat=n):
        out.append({
            "id": "c" + "".join("1" if neg else "0" for neg in negated),
            "principles": [p["antithesis"] if neg else p["definition"]
                           for p, neg in zip(checked, negated)],
            "negated": list(negated),
            "names": [p["name"] for p in checked],
        })
    return out
