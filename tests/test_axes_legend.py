"""The one-letter shape legend in `align_jax.axes` covers every einsum string in align_jax/,
and each letter has one meaning."""

import ast
import pathlib
import re

from align_jax import axes

ROOT = pathlib.Path(__file__).resolve().parents[1] / "align_jax"


def _legend() -> list[str]:
    """Letters defined in the docstring's "Legend:" block (one or two per line)."""
    block = axes.__doc__.split("Legend:", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"(?:^|\s{2,})([A-Za-z])  \S", block, flags=re.MULTILINE)


def _einsum_strings() -> list[tuple[str, str]]:
    """(file:line, spec) of every einsum call whose spec is a string literal."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "einsum"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                out.append((f"{path.relative_to(ROOT.parent)}:{node.lineno}", node.args[0].value))
    return out


def test_each_legend_letter_has_one_meaning():
    letters = _legend()
    assert len(letters) >= 20, letters  # the parser found the block
    assert len(letters) == len(set(letters)), sorted(letters)


def test_every_einsum_letter_is_in_the_legend():
    legend = set(_legend())
    specs = _einsum_strings()
    assert len(specs) >= 20, "the scan found no einsum strings"
    unknown = [f"{where}: {spec!r} uses {sorted(set(re.findall('[A-Za-z]', spec)) - legend)}"
               for where, spec in specs if set(re.findall("[A-Za-z]", spec)) - legend]
    assert not unknown, "einsum letters missing from axes.py's legend:\n" + "\n".join(unknown)
