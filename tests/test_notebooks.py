"""Every notebook in colab/ runs top to bottom (code cells executed in order, one namespace).

Each notebook ends by assigning `CHECKS`, a dict of claim -> bool computed from its own results
(losses, shapes, before/after numbers); the test fails on any false claim. Notebooks on the real
SmolLM2 model or with long training runs are marked slow.
"""

import json
import pathlib

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
SLOW = {"quickstart_smollm2.ipynb", "sami.ipynb", "aligner_squad.ipynb", "own_document.ipynb"}


def _params():
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
            for p in NOTEBOOKS]


def test_every_notebook_is_listed():
    assert {p.name for p in NOTEBOOKS} >= SLOW


@pytest.mark.parametrize("path", _params())
def test_notebook_runs(path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(ROOT)
    cells = json.loads(path.read_text())["cells"]
    code = [("".join(c["source"]), i) for i, c in enumerate(cells) if c["cell_type"] == "code"]
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
