"""Every notebook in colab/ runs top to bottom (code cells executed in order, one namespace).

Each notebook ends by assigning `CHECKS`, a dict of claim -> bool computed from its own results
(losses, shapes, before/after numbers); the test fails on any false claim. A notebook runs in its
own process (tests/run_notebook.py) with one CPU device, as on a Colab CPU runtime: under the 8 fake
devices of this process the data-parallel stages would hold 8 copies of the weights and optimizer
state (the bring-your-own-document notebook then needed over 13 GB instead of 5.5 GB). Every
run takes minutes on 2 CPU cores (the tiny quickstart too: 57 s of CPU), so all runs are marked
slow; the default suite checks the structure of every notebook.
"""

import os
import pathlib
import subprocess
import sys

import pytest
from run_notebook import code_cells

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
# Wall times of these runs on 2 CPU cores shared with other jobs: quickstart 119 s (57 s of CPU:
# 40 SFT + 20 DPO steps, three compiles), sami 101 s, aligner_squad 332 s, quickstart_smollm2
# 418 s, own_document 759 s (peak 5.8 GB resident).
SLOW = {"quickstart.ipynb", "quickstart_smollm2.ipynb", "sami.ipynb", "aligner_squad.ipynb",
        "own_document.ipynb"}


def _params():
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
            for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_structure(path):
    """Fast: it installs itself first, has no shell/magic lines, compiles, and ends in CHECKS."""
    code = code_cells(path)
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


def _one_device_env() -> dict[str, str]:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
                MPLBACKEND="Agg")


@pytest.mark.parametrize("path", _params())
def test_notebook_runs(path):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "run_notebook.py"), str(path)],
                         cwd=ROOT, env=_one_device_env(), capture_output=True, text=True,
                         timeout=2400)
    assert out.returncode == 0, (
        f"{path.name} failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    assert f"{path.name}: all checks hold" in out.stdout
