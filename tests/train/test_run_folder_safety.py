"""What a rerun on a run folder may do: nothing lost, nothing silent.

`--overwrite` deletes only what a run wrote; a resume refuses changed data, a folder with
checkpoints but no settings.json, and fewer steps than the newest checkpoint; a continuation
sets the earlier export aside so an interrupted one leaves no stale hf/."""

import json
import os
import pathlib
import shutil
import signal
import threading

import gin
import pytest

from align_jax import cli
from align_jax.train.status import EXIT_INTERRUPTED

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    yield
    gin.clear_config()


def _train(out, data, *params, num_steps=2, overwrite=False):
    gin.clear_config()
    args = ["train", "--gin_file=configs/runs/sft_tiny.gin", f"--output_dir={out}",
            f"--gin_param=entry.train_main.data={str(data)!r}",
            "--gin_param=entry.train_main.progress=False",
            f"--gin_param=entry.train_main.num_steps={num_steps}",
            "--gin_param=entry.train_main.save_every=1",
            "--gin_param=entry.train_main.log_every=1",
            # Constant: a cosine's warmup must fit inside the 2 steps of these runs.
            "--gin_param=optim.OptimizerConfig.schedule='constant'",
            "--gin_param=optim.OptimizerConfig.warmup_steps=0",
            *[f"--gin_param={p}" for p in params]]
    return cli.main(args + (["--overwrite"] if overwrite else []))


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run folder trained to step 2 (completed, exported) on its own copy of the data."""
    base = tmp_path_factory.mktemp("finished")
    data = base / "sft.jsonl"
    shutil.copy(ROOT / "examples" / "sft.jsonl", data)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert _train(base / "run", data) == 0
    finally:
        os.chdir(cwd)
        gin.clear_config()
    return base


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run and its data: (run folder, data file)."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run", tmp_path / "sft.jsonl"


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("(rerun with --traceback"), err
    return err[0]


def test_overwrite_refuses_a_folder_that_never_held_a_run(tmp_path, capsys):
    # `--overwrite` deleted the user's model/, tokenizer/, cache/, hf/ and metrics.jsonl.
    out = tmp_path / "mine"
    for name in ("model", "tokenizer", "cache", "hf"):
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text(f"the user's {name}")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = _snapshot(out)
    assert _train(out, ROOT / "examples" / "sft.jsonl", overwrite=True) == 1
    line = _one_line(capsys)
    assert "holds no training run" in line and "metrics.jsonl" in line and "model" in line
    assert _snapshot(out) == before


def test_overwrite_clears_a_run_folder(run, capsys):
    out, data = run
    (out / "notes.txt").write_text("the user's")  # not a run's file: kept
    assert _train(out, data, num_steps=1, overwrite=True) == 0
    assert json.loads((out / "status.json").read_text())["step"] == 1
    assert sorted(os.listdir(out / "checkpoints")) == ["1"]
    assert (out / "notes.txt").read_text() == "the user's"


def test_a_resume_on_data_edited_in_place_is_refused(run, capsys):
    out, data = run
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:-1]))  # same path, one record fewer
    before = _snapshot(out)
    assert _train(out, data, num_steps=4) == 1
    line = _one_line(capsys)
    assert str(data) in line and "changed" in line and "--overwrite" in line
    assert _snapshot(out) == before


def test_checkpoints_without_settings_are_not_resumed(run, capsys):
    # With settings.json deleted, another learning rate resumed the old checkpoints silently.
    out, data = run
    (out / "settings.json").unlink()
    before = _snapshot(out)
    assert _train(out, data, "optim.OptimizerConfig.learning_rate=0.5", num_steps=4) == 1
    line = _one_line(capsys)
    assert "settings.json" in line and "step 2" in line and "--overwrite" in line
    assert _snapshot(out) == before


def test_fewer_steps_than_the_newest_checkpoint_is_refused(run, capsys):
    # It exited 0 and labelled the run with the smaller number.
    out, data = run
    before = _snapshot(out)
    assert _train(out, data, num_steps=1) == 1
    line = _one_line(capsys)
    assert "num_steps=1" in line and "step 2" in line
    assert _snapshot(out) == before


def test_an_interrupted_continuation_leaves_no_stale_export(run, capsys):
    # 400 done, rerun to 600, SIGTERM at 450: the old hf/ stayed while status said interrupted.
    out, data = run
    data.write_text(data.read_text())  # same content, new mtime: still the same data
    old_export = _snapshot(out / "hf")
    metrics = out / "metrics.jsonl"
    stop = threading.Event()

    def sigterm_after_step_3():
        while not stop.wait(0.05):
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
            if max(steps) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                stop.wait(2.0)

    watcher = threading.Thread(target=sigterm_after_step_3, daemon=True)
    watcher.start()
    try:
        assert _train(out, data, num_steps=100000) == EXIT_INTERRUPTED
    finally:
        stop.set()
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"
    assert not (out / "hf").exists()
    assert _snapshot(out / "hf_step_2") == old_export
    assert "export of step 2 moved from hf/ to hf_step_2/" in capsys.readouterr().out


def test_a_moved_folder_with_its_data_reruns(finished, tmp_path, capsys):
    # A moved or copied folder could not be rerun: settings.json held absolute paths.
    shutil.copytree(finished, tmp_path / "before")
    shutil.move(tmp_path / "before", tmp_path / "after")  # the old path is gone
    out = tmp_path / "after" / "run"
    before = _snapshot(out)
    assert _train(out, tmp_path / "after" / "sft.jsonl") == 0
    assert "already completed at step 2" in capsys.readouterr().out
    assert _snapshot(out) == before
