"""Every notebook in colab/ runs top to bottom (code cells executed in order, one namespace).

Each notebook ends by assigning `CHECKS`, a dict of claim -> bool computed from its own results
(losses, shapes, before/after numbers); the test fails on any false claim. Every notebook trains
for minutes on a CPU, so their runs are marked slow; the default suite checks their structure.
"""

import json
import pathlib

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
# Measured on 2 shared CPU cores, each over 30 s (the tiny quickstart too: 40 SFT + 20 DPO steps).
SLOW = {"quickstart.ipynb", "quickstart_smollm2.ipynb", "sami.ipynb", "aligner_squad.ipynb",
        "own_document.ipynb"}


def _params():
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
            for p in NOTEBOOKS]


def _code_cells(path):
    cells = json.loads(path.read_text())["cells"]
    return [("".join(c["source"]), i) for i, c in enumerate(cells) if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_structure(path):
    """Fast: it installs itself first, has no shell/magic lines, compiles, and ends in CHECKS."""
    code = _code_cells(path)
    assert code, f"{path.name} has no code"
    first = code[0][0]
    assert "find_spec(\"align_jax\")" in first and "pip" in first, \
        f"{path.name}: the first code cell must install align_jax when it is missing"
    for source, i in code:
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), \
            f"{path.name} cell {i}: shell/magic lines cannot run outside Jupyter"
        compile(source, f"{path.name}[cell {i}]", "exec")
    assert "CHECKS = {" in code[-1][0], f"{path.name}: the last code cell must assign CHECKS"


def test_every_notebook_is_listed():
    assert {p.name for p in NOTEBOOKS} == SLOW


@pytest.mark.parametrize("path", _params())
def test_notebook_runs(path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(ROOT)
    code = _code_cells(path)
    assert code, f"{path.name} has no code"
    namespace: dict = {"__name__": "__main__"}
    for source, i in code:
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), \
            f"{path.name} cell {i}: shell/magic lines cannot run outside Jupyter"
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
    checks = namespace.get("CHECKS")
    assert isinstance(checks, dict) and checks, f"{path.name} defines no CHECKS dict"
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, f"{path.name}: checks failed: {failed}"
