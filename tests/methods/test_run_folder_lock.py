"""`align-jax run` and `align-jax sdg` take the run-folder lock before they write anything: a
second command on a folder in use refuses in one line and leaves every file as it was."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import gin
import pytest

from align_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_gin(monkeypatch):
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def holder():
    """A live process that holds the lock of a folder (as a running first command does)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hold(folder: pathlib.Path, proc) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(),
                                              "time": 0.0}))


def test_a_second_recipe_on_a_running_folder_refuses_before_writing(tmp_path, holder, capsys):
    # The second run rewrote data/*.jsonl before a stage's lock refused it: the first run
    # trained on other records than its report counted.
    out = tmp_path / "recipe"
    _hold(out, holder)
    (out / "data").mkdir()
    (out / "data" / "sft_train.jsonl").write_text('{"prompt": "first run", "response": "x"}\n')
    (out / "report.md").write_text("# the first run's report\n")
    before = _snapshot(out)
    code = cli.main(["run", "--gin_file=configs/runs/value_alignment_tiny.gin",
                     f"--output_dir={out}",
                     "--gin_param=value_alignment.value_alignment.progress=False"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert f"in use by pid {holder.pid}" in err[0] and str(out) in err[0], err
    assert _snapshot(out) == before
    assert sorted(os.listdir(out)) == [".lock", "data", "report.md"]


def test_sdg_on_a_running_folder_refuses_before_writing(tmp_path, holder, capsys):
    out = tmp_path / "sdg"
    _hold(out, holder)
    (out / "principles.jsonl").write_text('{"principle": "the first run\'s"}\n')
    before = _snapshot(out)
    code = cli.main(["sdg", "--gin_file=configs/runs/sdg_principles.gin", f"--output_dir={out}",
                     "--gin_param=entry.sdg_main.teacher=None",
                     "--gin_param=entry.sdg_main.principles_file='examples/principles.jsonl'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert f"in use by pid {holder.pid}" in err[0], err
    assert _snapshot(out) == before


def test_the_lock_is_released_after_a_recipe_and_sdg(tmp_path):
    out = tmp_path / "sdg"
    code = cli.main(["sdg", "--gin_file=configs/runs/sdg_principles.gin", f"--output_dir={out}",
                     "--gin_param=entry.sdg_main.teacher=None",
                     "--gin_param=entry.sdg_main.principles_file='examples/principles.jsonl'"])
    assert code == 0
    assert not (out / ".lock").exists() and (out / "config.gin").exists()
