"""Runs that never lie: SIGTERM/SIGINT, reruns, one writer, corrupt checkpoints, atomic convert."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import gin
import jax
import numpy as np
import pytest
from train_fixtures import CountingIterator, nll_loss, tiny_config

from align_jax import cli, run_lock, sharding
from align_jax.models.hf import config_to_hf
from align_jax.train import OptimizerConfig, train
from align_jax.train.checkpoint import CorruptCheckpointError, load_params
from align_jax.train.status import EXIT_INTERRUPTED

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    yield
    gin.clear_config()


def _steps(out):
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in open(path)] if path.exists() else []


def _signal_when(predicate, sig, *, repeat):
    """Sends `sig` to this process once `predicate()` holds (again every 2 s if `repeat`)."""
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if predicate():
                os.kill(os.getpid(), sig)
                if not repeat:
                    return
                stop.wait(2.0)
            stop.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return stop


def _train(out, *params, overwrite=False):
    gin.clear_config()
    args = ["train", "--gin_file=configs/runs/sft_tiny.gin", f"--output_dir={out}",
            "--gin_param=entry.train_main.progress=False",
            "--gin_param=entry.train_main.num_steps=100000",
            "--gin_param=entry.train_main.save_every=100000",
            "--gin_param=entry.train_main.log_every=1", *[f"--gin_param={p}" for p in params]]
    return cli.main(args + (["--overwrite"] if overwrite else []))


@pytest.mark.slow
def test_sigterm_then_sigint_save_resume_and_a_changed_rerun_refuses(tmp_path, capsys):
    out = tmp_path / "run"
    # SIGTERM (preemption) after two logged steps: a checkpoint, exit 75, "interrupted".
    stop = _signal_when(lambda: len(_steps(out)) >= 2, signal.SIGTERM, repeat=True)
    try:
        assert _train(out) == EXIT_INTERRUPTED
    finally:
        stop.set()
    status = json.loads((out / "status.json").read_text())
    first = status["step"]
    assert status["status"] == "interrupted" and first >= 2
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["hf_export"] is None
    assert not (out / "hf").exists()  # nothing that looks like a finished export
    assert (out / "checkpoints" / str(first)).is_dir()
    assert "interrupted at step" in capsys.readouterr().err

    # Ctrl-C in the resumed run: resumes at `first`, saves again, metrics hold each step once.
    stop = _signal_when(lambda: len(_steps(out)) >= first + 2, signal.SIGINT, repeat=False)
    try:
        assert _train(out) == EXIT_INTERRUPTED
    finally:
        stop.set()
    second = json.loads((out / "status.json").read_text())["step"]
    assert second >= first + 2
    assert json.loads((out / "run_info.json").read_text())["resumed_from_step"] == first
    steps = _steps(out)
    assert steps == list(range(1, second + 1)), steps

    # Other settings: refused with the diff, nothing of the run rewritten.
    before = {p: (out / p).read_bytes() for p in ("config.gin", "run_info.json", "status.json")}
    capsys.readouterr()
    assert _train(out, "optim.OptimizerConfig.learning_rate=0.5") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "optimizer.learning_rate: 0.003 -> 0.5" in err[0] and "--overwrite" in err[0]
    assert before == {p: (out / p).read_bytes() for p in before}

    # A second writer on the folder refuses while the holder lives.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        assert _train(out) == 1
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # Its pid is gone now: the stale lock is taken over (and released).
    path = run_lock.acquire(out)
    assert json.loads(open(path).read())["pid"] == os.getpid()
    run_lock.release(path)
    assert not (out / ".lock").exists()


def _tiny_run(workdir, num_steps, **kw):
    return train(config=tiny_config(), loss_fn=nll_loss, data_iterator=CountingIterator(),
                 optimizer=OptimizerConfig(learning_rate=1e-3), num_steps=num_steps,
                 mesh_spec=sharding.MeshSpec(data=8), rules="dp", workdir=workdir,
                 save_every=2, keep=5, log_every=1, progress=False, **kw)


def _corrupt_metadata(step_dir):
    for path in step_dir.rglob("_METADATA"):
        path.write_text("{not json")


def _truncate_arrays(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 64
             and "METADATA" not in p.name]
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 3)


@pytest.mark.parametrize("damage", [_corrupt_metadata,
                                    pytest.param(_truncate_arrays, marks=pytest.mark.slow)])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    workdir = tmp_path / "run"
    _tiny_run(workdir, 4)
    damage(workdir / "checkpoints" / "4")
    state = _tiny_run(workdir, 6)
    assert int(state.step) == 6
    assert json.loads((workdir / "run_info.json").read_text())["resumed_from_step"] == 2
    assert (workdir / "checkpoints-corrupt" / "4").is_dir()
    said = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert said and str(workdir / "checkpoints" / "4") in said[0] and "\n" not in said[0]
    # Every step unreadable: one line, no training from scratch over them.
    for step_dir in (workdir / "checkpoints").iterdir():
        damage(step_dir)
    with pytest.raises(CorruptCheckpointError, match="no readable checkpoint"):
        _tiny_run(workdir, 8)


def test_convert_failing_midway_leaves_the_old_export(tmp_path, monkeypatch):
    from align_jax.train import convert
    run = tmp_path / "run"
    _tiny_run(run, 2)
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text(json.dumps(config_to_hf(tiny_config())))
    out = tmp_path / "export"
    assert convert.convert_main(run_dir=str(run), output_dir=str(out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "model.safetensors" in before

    def dies_midway(config, params, path, **kw):
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(convert, "save_hf", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        convert.convert_main(run_dir=str(run), output_dir=str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []
    params = load_params(run / "checkpoints")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_convert_killed_midway_leaves_the_old_export(tmp_path):
    """A real SIGKILL while the new export is being written."""
    run = tmp_path / "run"
    _tiny_run(run, 2)
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text(json.dumps(config_to_hf(tiny_config())))
    out = tmp_path / "export"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "align_jax.cli", "convert",
           f"--gin_param=convert.convert_main.run_dir='{run}'", f"--output_dir={out}"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".export.tmp")
                                             for p in tmp_path.iterdir()):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    shutil.rmtree(out)
