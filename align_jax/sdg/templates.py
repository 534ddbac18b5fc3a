"""Prompt templates for synthetic data generation, kept as files the caller can swap.

A template file is an optional header of lines starting with "#" that documents its
placeholders, closed by a line "---", then the body. A header line "# constraint: <regex>"
declares the output format as a regular expression (its "{nex}" filled like the body's):
stages send it as a constraint to teachers that apply constraints (structured generation,
`align_jax.generate.constraints`), so a small teacher writes nothing else. The body is
filled with str.format,
so literal braces (JSON examples) are written doubled: {{ and }}. Templates are found by
name in configs/sdg_templates/ (or $ALIGN_JAX_SDG_TEMPLATES) or given as a path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import string
from collections.abc import Iterable, Mapping

from align_jax.sdg import parsing

# A string value after a key in a JSON example of a template body ("key": "value").
_EXAMPLE_VALUE = re.compile(r'"[^"\n]+":\s*"([^"\n]+)"')

TEMPLATE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs", "sdg_templates")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Template:
    """A parsed template: `fields` are the placeholder names its body uses."""
    name: str
    path: str
    body: str
    fields: frozenset[str]
    constraint: str | None = None

    @functools.cached_property
    def example_values(self) -> frozenset[str]:
        """The placeholder texts of the body's JSON example ({{"question": "a situation or
        dilemma", ...}}), normalised by `parsing.echo_key`: a small teacher copies them
        verbatim, and a record that does is rejected as "template_echo"."""
        return frozenset(parsing.echo_key(v) for v in _EXAMPLE_VALUE.findall(self.body))

    def output_constraint(self, **values):
        """The declared output constraint (`regex` of the header line, "{nex}" etc. filled),
        or None when the template declares none."""
        if self.constraint is None:
            return None
        from align_jax.generate import constraints  # the compiler only when it is used
        pattern = self.constraint
        for k, v in values.items():
            pattern = pattern.replace("{" + k + "}", str(v))
        try:
            return constraints.regex(pattern)
        except ValueError as e:
            raise ValueError(f"{self.path}: bad '# constraint:' line: {e}") from e

    def render(self, **values) -> str:
        """Fill the placeholders.

        Args:
          **values: one value per placeholder; extra values are ignored.
        Returns:
          The prompt text.
        Raises:
          ValueError naming the template file and the missing placeholder.
        """
        missing = sorted(self.fields - set(values))
        if missing:
            raise ValueError(f"{self.path}: no value given for placeholder(s) {missing}")
        return self.body.format(**{k: values[k] for k in self.fields})

    def require(self, fields: Iterable[str]) -> Template:
        """Check that the body uses these placeholders (a stage needs them); returns self."""
        absent = sorted(set(fields) - self.fields)
        if absent:
            raise ValueError(
                f"{self.path}: template must use placeholder(s) {absent}; it uses "
                f"{sorted(self.fields)}")
        return self


def _search_dirs() -> list[str]:
    extra = os.environ.get("ALIGN_JAX_SDG_TEMPLATES")
    return ([extra] if extra else []) + [TEMPLATE_DIR]


def parse_template(text: str, *, name: str, path: str) -> Template:
    """Split header and body and collect the placeholders (see module docstring)."""
    lines = text.splitlines(keepends=True)
    body, constraint = text, None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped == "---":
            body = "".join(lines[i + 1:])
            break
        if stripped and not stripped.startswith("#"):
            constraint = None
            break  # no header: the whole file is the body
        if stripped.startswith("# constraint:"):
            constraint = stripped[len("# constraint:"):].strip()
    fields = set()
    try:
        for _, field, _, _ in string.Formatter().parse(body):
            if field is None:
                continue
            if not field.isidentifier():
                raise ValueError(f"placeholder {{{field}}} is not a plain name")
            fields.add(field)
    except ValueError as e:
        raise ValueError(
            f"{path}: bad template ({e}); write literal braces as {{{{ and }}}}") from e
    return Template(name=name, path=path, body=body.strip("\n") + "\n", fields=frozenset(fields),
                    constraint=constraint)


def load_template(name_or_path: str | os.PathLike) -> Template:
    """Load a template by name (e.g. "instruct_questions") or by file path.

    Args:
      name_or_path: a path to an existing file, or a name looked up as NAME.txt in
        $ALIGN_JAX_SDG_TEMPLATES, then configs/sdg_templates/.
    Returns:
      The parsed Template.
    """
    candidate = os.fspath(name_or_path)
    if os.path.isfile(candidate):
        path = candidate
    else:
        path = None
        for d in _search_dirs():
            p = os.path.join(d, candidate if candidate.endswith(".txt") else candidate + ".txt")
            if os.path.isfile(p):
                path = p
                break
        if path is None:
            raise FileNotFoundError(
                f"no SDG template {candidate!r}: not a file and not found in {_search_dirs()}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    name = os.path.splitext(os.path.basename(path))[0]
    return parse_template(text, name=name, path=path)


def resolve_templates(defaults: Mapping[str, str],
                      overrides: Mapping[str, str | os.PathLike | Template] | None = None,
                      *, strict: bool = False) -> dict[str, Template]:
    """Templates for a stage: `defaults` maps role -> name, `overrides` replace some roles.

    Args:
      defaults: e.g. {"questions": "instruct_questions", "answer": "instruct_answer"}.
      overrides: role -> name, path or an already loaded Template.
      strict: reject override roles that are not in `defaults` (a typo would otherwise
        silently keep the default); stages pass the run's whole mapping non-strictly.
    Returns:
      role -> Template.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown and strict:
        raise ValueError(f"unknown template role(s) {unknown}; expected {sorted(defaults)}")
    out = {}
    for role, default in defaults.items():
        value = overrides.get(role, default)
        out[role] = value if isinstance(value, Template) else load_template(value)
    return out
