"""Constraints as tokenizer-independent specs: a regex, a list of choices or a JSON schema.

A `Constraint` is frozen and hashable (kind + canonical payload), so it keys the per-tokenizer
compilation cache and can be shared between requests. Construction validates it (the regex
compiles, the schema stays in the supported subset, some text matches) and raises ValueError
with one line naming the pattern or keyword, before any generation starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

from align_jax.generate.constraints import automaton, schema


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What generated text must match.

    kind: "regex", "choice" or "json_schema".
    payload: the regex; the JSON list of choices; the schema as compact JSON (property order
      kept: it is the order the properties are generated in).
    pattern: the Rust-syntax regex the automaton is built from (derived).
    """

    kind: str
    payload: str
    pattern: str = dataclasses.field(compare=False, repr=False)

    def describe(self) -> str:
        text = self.payload if len(self.payload) <= 80 else self.payload[:80] + "..."
        return f"{self.kind} constraint {text!r}"

    def validate(self, text: str) -> bool:
        """Whether a finished text satisfies the constraint, checked on the host.

        regex: `re.fullmatch` (the automaton's own walk when Python cannot compile the
        Rust-syntax pattern); choice: one of the options; json_schema: `json.loads` and
        `jsonschema` validation (any whitespace, as JSON allows).
        """
        if self.kind == "choice":
            return text in json.loads(self.payload)
        if self.kind == "json_schema":
            import jsonschema  # local: only schema checks need it

            try:
                value = json.loads(text)
            except ValueError:
                return False
            return jsonschema.Draft202012Validator(json.loads(self.payload)).is_valid(value)
        try:
            return re.fullmatch(self.payload, text) is not None
        except re.error:
            return _dfa_accepts(self.pattern, text)


def _dfa_accepts(pattern: str, text: str) -> bool:
    dfa = automaton.byte_dfa(pattern)
    s = 0
    for b in text.encode():
        s = int(dfa.delta_QY[s, b])
        if s == automaton.DEAD:
            return False
    return bool(dfa.accepting_Q[s])


def _checked(kind: str, payload: str, pattern: str) -> Constraint:
    c = Constraint(kind=kind, payload=payload, pattern=pattern)
    automaton.byte_dfa(pattern)  # raises ValueError for a bad or empty pattern
    return c


def regex(pattern: str) -> Constraint:
    """Text that matches `pattern` entirely (Rust `regex` syntax, as vLLM's guided_regex).

    Raises:
      ValueError naming the pattern when it is invalid or matches nothing.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"regex: expected a pattern string, got {type(pattern).__name__}")
    return _checked("regex", pattern, pattern)


def choice(options: Sequence[str]) -> Constraint:
    """Text that equals one of `options` exactly.

    Raises:
      ValueError when options is empty or holds a non-string or an empty string.
    """
    if isinstance(options, str) or not isinstance(options, Sequence) or not options:
        raise ValueError("choice: expected a non-empty list of strings")
    for i, o in enumerate(options):
        if not isinstance(o, str) or not o:
            raise ValueError(f"choice: option {i} must be a non-empty string, got {o!r}")
    opts = list(dict.fromkeys(options))
    return _checked("choice", json.dumps(opts, ensure_ascii=False),
                    "(?:" + "|".join(schema.escape(o) for o in opts) + ")")


def json_schema(spec: dict | str) -> Constraint:
    """JSON text that validates against `spec` (a dict or its JSON text), within the supported
    subset (see `align_jax.generate.constraints.schema`).

    Raises:
      ValueError naming the JSON path and the unsupported keyword or bad value.
    """
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"json_schema: not valid JSON ({e})") from None
    if spec == {"type": "object"} or spec == {}:
        pattern = schema.generic_json_regex()
    else:
        pattern = schema.schema_regex(spec)
    return _checked("json_schema", json.dumps(spec, ensure_ascii=False, separators=(",", ":")),
                    pattern)


def json_object() -> Constraint:
    """Any JSON object (OpenAI's response_format json_object), nested at most 3 levels."""
    return json_schema({"type": "object"})
