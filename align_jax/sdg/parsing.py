"""Tolerant parsers for teacher outputs.

Teachers wrap JSON lines in prose or ``` fences, stop mid-line when they hit max_tokens,
fall back to numbered lists, and answer yes/no questions with a sentence. Every parser
here returns what it could use plus a list of rejects, each {"reason", "text"}, and never
raises on any input string: a bad generation is data to count, not an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence

Reject = dict[str, str]

_DECODER = json.JSONDecoder()
_LIST_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|[-*\u2022+])\s+(.*\S)\s*$")
_SNIPPET = 200


def _reject(reason: str, text: str) -> Reject:
    return {"reason": reason, "text": text[:_SNIPPET]}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _clean_value(value: str) -> str:
    value = value.strip()
    # Teachers sometimes quote list items or bold them.
    for a, b in (('"', '"'), ("'", "'"), ("**", "**"), ("\u201c", "\u201d")):
        if len(value) > len(a) + len(b) and value.startswith(a) and value.endswith(b):
            value = value[len(a):-len(b)].strip()
    return value


def _scan_json_objects(text: str) -> tuple[list[dict], list[Reject]]:
    """Every top-level JSON object in `text`, wherever it sits."""
    objects, rejects = [], []
    pos = 0
    while True:
        start = text.find("{", pos)
        if start < 0:
            break
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            # A truncated or malformed object: skip to the next line rather than
            # re-scanning its insides, where a nested brace could parse as a fragment.
            newline = text.find("\n", start)
            rejects.append(_reject("invalid_json", text[start:newline if newline >= 0 else None]))
            if newline < 0:
                break
            pos = newline + 1
            continue
        if isinstance(obj, dict):
            objects.append(obj)
        pos = end
    return objects, rejects


def _validate(obj: dict, required: Sequence[str],
              optional: Sequence[str]) -> tuple[dict | None, str]:
    lowered = {}
    for k, v in obj.items():
        if isinstance(k, str):
            lowered.setdefault(k.strip().lower(), v)
    item = {}
    for key in required:
        value = lowered.get(key.lower())
        if value is None:
            return None, f"missing_field:{key}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return None, f"non_string_field:{key}"
        value = value.strip()
        if not value:
            return None, f"empty_field:{key}"
        item[key] = value
    for key in optional:
        value = lowered.get(key.lower())
        if isinstance(value, str) and value.strip():
            item[key] = value.strip()
    return item, ""


def parse_list_items(text: str) -> list[str]:
    """Items of a numbered or bulleted list ("1. x", "2) y", "- z", "* w"), in order."""
    items = []
    for line in text.splitlines():
        m = _LIST_ITEM.match(line)
        if m:
            value = _clean_value(m.group(1))
            if value:
                items.append(value)
    return items


_QUESTION_LABEL = re.compile(r"^[\s*#>-]*(?:\[\d+\]|\d+[.)]|question\s*\d*\s*[:.)-])?\W*", re.I)


def parse_question_lines(text: str) -> list[str]:
    """Lines that are questions ("[1] "How ...?"", "Question 2: Why ...?"), labels and quotes
    removed: what a small teacher writes when it ignores the requested format."""
    out = []
    for line in text.splitlines():
        value = line.strip().strip("`").strip()
        if not value.rstrip("\"' ").endswith("?"):
            continue
        value = _QUESTION_LABEL.sub("", value).strip().strip("\"'").strip()
        if len(value.split()) >= 3:
            out.append(value)
    return out


def parse_json_records(text: str, *, required: Sequence[str], optional: Sequence[str] = (),
                       list_key: str | None = None) -> tuple[list[dict], list[Reject]]:
    """JSON objects (JSONL, a JSON array, inside prose or fences) with the required fields.

    Args:
      text: a teacher completion.
      required: fields each item must have as a non-empty string (keys matched
        case-insensitively; numbers are turned into strings).
      optional: string fields kept when present.
      list_key: when no JSON object is found at all, each item of a numbered/bulleted
        list becomes {list_key: item} (the fallback for single-field outputs), and failing
        that each line that is a question (`parse_question_lines`).
    Returns:
      (items, rejects): items are dicts holding exactly the found fields, exact repeats
      within this text removed; rejects say why each other piece was dropped.
    """
    if not isinstance(text, str):
        return [], [_reject("not_text", repr(text))]
    objects, rejects = _scan_json_objects(text)
    items, seen = [], set()

    def add(item):
        key = tuple(_norm(item[k]) for k in required)
        if key in seen:
            rejects.append(_reject("duplicate_in_output", json.dumps(item)))
        else:
            seen.add(key)
            items.append(item)

    for obj in objects:
        item, why = _validate(obj, required, optional)
        if item is None:
            rejects.append(_reject(why, json.dumps(obj, ensure_ascii=False)))
        else:
            add(item)
    if not objects and list_key is not None:
        for value in parse_list_items(text) or parse_question_lines(text):
            # "Question: ..." inside a list item is a label, not content.
            value = re.sub(rf"^{re.escape(list_key)}\s*:\s*", "", value, flags=re.I).strip()
            if value:
                add({list_key: value})
    if not items and not rejects:
        rejects.append(_reject("no_items", text))
    return items, rejects


_YES_NO = re.compile(
    r"^\W*(?:(?:final\s+)?(?:answer|verdict|decision|response)\s*(?:is)?\s*[:\-]?\s*)?\W*"
    r"(yes|no)\b[\s.,:;!\-\u2013\u2014)]*(.*)$", re.I | re.S)


def parse_yes_no(text: str) -> tuple[bool | None, str]:
    """A yes/no verdict and its reason.

    Accepts "Yes. Because ...", "**No** - ...", "Answer: yes\\nReason: ..." and JSON like
    {"answer": "no", "reason": "..."}.

    Args:
      text: a teacher completion.
    Returns:
      (True/False, reason) or (None, why the verdict could not be read).
    """
    if not isinstance(text, str):
        return None, "not_text"
    objects, _ = _scan_json_objects(text)
    for obj in objects:
        lowered = {str(k).strip().lower(): v for k, v in obj.items()}
        for key in ("answer", "verdict", "decision", "contains_values"):
            value = lowered.get(key)
            if isinstance(value, bool):
                verdict = value
            elif isinstance(value, str) and _norm(value) in ("yes", "no"):
                verdict = _norm(value) == "yes"
            else:
                continue
            reason = lowered.get("reason", "")
            return verdict, reason.strip() if isinstance(reason, str) else ""
    m = _YES_NO.match(text.strip())
    if m is None:
        return None, "no_verdict"
    reason = re.sub(r"^[^\w\"'(]+", "", m.group(2).strip())
    reason = re.sub(r"^reason\s*[:\-]\s*", "", reason, flags=re.I).strip()
    return m.group(1).lower() == "yes", reason


def parse_sections(text: str, labels: Sequence[str], *, implicit_first: bool = True,
                   stop_labels: Sequence[str] = ()) -> tuple[dict[str, str] | None, str]:
    """Labelled sections of a completion, e.g. "Critique: ..." then "Aligned response: ...".

    Args:
      text: a teacher completion.
      labels: section labels in their expected order; each must open a line ("Label:",
        optionally bold "**Label:**" or a markdown heading).
      implicit_first: text before the first found label belongs to labels[0] when
        labels[0] itself is absent (the prompt ended with that label).
      stop_labels: a line opening with one of these ends the parse (the teacher went on
        to invent the next example).
    Returns:
      ({label: content}, "") or (None, reason) if a section is missing or empty.
    """
    if not isinstance(text, str):
        return None, "not_text"
    names = list(labels) + [s for s in stop_labels if s not in labels]
    pattern = re.compile(
        r"^[ \t]*(?:#+[ \t]*)?\**[ \t]*(" + "|".join(re.escape(n) for n in names) +
        r")[ \t]*\**[ \t]*:[ \t]*\**", re.I | re.M)
    lookup = {n.lower(): n for n in names}
    found: list[tuple[str, int, int]] = []
    for m in pattern.finditer(text):
        found.append((lookup[m.group(1).lower()], m.start(), m.end()))
    sections: dict[str, str] = {}
    if implicit_first and labels and (not found or found[0][0] != labels[0]):
        first_end = found[0][1] if found else len(text)
        sections[labels[0]] = text[:first_end]
    for idx, (name, _, end) in enumerate(found):
        if name in stop_labels and name not in labels:
            break
        if name in sections:  # a repeated label means the teacher started a new example
            break
        stop = found[idx + 1][1] if idx + 1 < len(found) else len(text)
        sections[name] = text[end:stop]
    out = {}
    for label in labels:
        value = sections.get(label)
        if value is None:
            return None, f"missing_section:{label}"
        value = value.strip().strip("*").strip()
        if not value:
            return None, f"empty_section:{label}"
        out[label] = value
    return out, ""


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def echo_key(text: str) -> str:
    """`text` lower-cased, its runs of whitespace and its end punctuation dropped: the key
    under which a field is compared with a template's example placeholders."""
    return " ".join(text.lower().split()).strip(" .!?;:,'\"")


def text_problem(text: str, *, markers: Sequence[str] = (), min_letters: float = 0.4,
                 max_chars: int = 20000, echoes: Collection[str] = ()) -> str | None:
    """Why a generated field is unusable, or None if it is fine.

    Args:
      text: the field.
      markers: template markers that must not leak into content (e.g. "Critique:").
      min_letters: least share of letters among non-space characters.
      max_chars: longest acceptable field.
      echoes: `echo_key`s of the template's example placeholders
        (`Template.example_values`); a field equal to one is a copy, not content.
    Returns:
      "not_text", "empty", "too_long", "non_text" (control characters, or too few
      letters: code, numbers, symbols), "leaked_marker" or "template_echo", else None.
    """
    if not isinstance(text, str):
        return "not_text"
    stripped = text.strip()
    if not stripped:
        return "empty"
    if len(stripped) > max_chars:
        return "too_long"
    if _CONTROL.search(stripped):
        return "non_text"
    visible = [c for c in stripped if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    # Very short answers ("Au.", "206") are legitimate; the ratio only judges longer text.
    if len(visible) > 12 and letters < min_letters * len(visible):
        return "non_text"
    lowered = stripped.lower()
    for marker in markers:
        if marker.lower() in lowered:
            return "leaked_marker"
    if echoes and echo_key(stripped) in echoes:
        return "template_echo"
    return None


def json_lines(text: str, *, required: Sequence[str]) -> tuple[list[dict], list[Reject]]:
    """JSON objects one per line, read with `json.loads` (no repair): the reader for output
    written under a JSON-lines constraint, where anything else is a real failure.

    Args:
      text: a teacher completion.
      required: fields each object must have as a non-empty string.
    Returns:
      (items with exactly the required fields, rejects).
    """
    items, rejects = [], []
    # "\n" only: the constraint excludes it from strings, but not \r or \x0c, which
    # str.splitlines would also cut at.
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested past the stack
            rejects.append(_reject("invalid_json", line))
            continue
        if not isinstance(obj, dict) or not all(
                isinstance(obj.get(k), str) and obj[k].strip() for k in required):
            rejects.append(_reject("missing_field", line))
            continue
        items.append({k: obj[k].strip() for k in required})
    if not items and not rejects:
        rejects.append(_reject("no_items", text))
    return items, rejects
