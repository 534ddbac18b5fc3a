"""Checkpoints whose arrays restore without complaint but are wrong (orbax 0.12 keeps no
checksums), every checkpoint unreadable, and a save that fails (disk full): each is set aside or
reported in one line, never a silent non-finite run nor pages of stack."""

import asyncio
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import gin
import jax
import jax.numpy as jnp
import pytest
from train_fixtures import CountingIterator, nll_loss, tiny_config

from align_jax import cli, sharding
from align_jax.train import OptimizerConfig, checkpoint, train
from align_jax.train.checkpoint import Checkpointer
from align_jax.train.loop import NonFiniteLossError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tiny_run(workdir, num_steps):
    return train(config=tiny_config(), loss_fn=nll_loss, data_iterator=CountingIterator(),
                 optimizer=OptimizerConfig(learning_rate=1e-3), num_steps=num_steps,
                 mesh_spec=sharding.MeshSpec(data=8), rules="dp", workdir=workdir,
                 save_every=2, keep=5, log_every=1, progress=False)


def _save_damaged(workdir, state, step, damage):
    """Step `step` holding `state` with damaged params, as a bit flip leaves it on disk: a
    checkpoint that orbax reads back without an error."""
    ck = Checkpointer(workdir / "checkpoints", keep=5)
    data_state = ck.data_state(int(state.step))
    ck.save(step, state.replace(params=jax.tree.map(damage, state.params)),
            data_state=data_state)
    ck.close()


def _resumed_from(workdir):
    return json.loads((workdir / "run_info.json").read_text())["resumed_from_step"]


def test_a_checkpoint_with_nan_arrays_is_set_aside_and_the_previous_used(tmp_path, caplog):
    workdir = tmp_path / "run"
    state = _tiny_run(workdir, 4)
    # An exponent bit flipped to all ones: NaN (the run never saves a non-finite state).
    _save_damaged(workdir, state, 6, lambda x: x.at[(0,) * x.ndim].set(jnp.nan))
    state = _tiny_run(workdir, 8)
    assert int(state.step) == 8 and _resumed_from(workdir) == 4
    assert (workdir / "checkpoints-corrupt" / "6").is_dir()
    said = [r.getMessage() for r in caplog.records if "non-finite values" in r.getMessage()]
    assert said and str(workdir / "checkpoints" / "6") in said[0] and "\n" not in said[0]


def test_a_checkpoint_whose_first_step_is_non_finite_is_set_aside(tmp_path):
    """Finite but absurd arrays (high exponent bits flipped) restore and pass any finiteness
    check; the first step from them overflows. Before, every rerun stopped there the same way."""
    workdir = tmp_path / "run"
    state = _tiny_run(workdir, 4)
    _save_damaged(workdir, state, 6, lambda x: x * 1e30)
    with pytest.raises(NonFiniteLossError, match=r"first step from checkpoint 6 .*corrupt; "
                                                 r"moved it to .*rerun the same command to "
                                                 r"resume from step 4"):
        _tiny_run(workdir, 8)
    assert (workdir / "checkpoints-corrupt" / "6").is_dir()
    assert not (workdir / "checkpoints" / "6").exists()
    state = _tiny_run(workdir, 8)  # the rerun resumes from the previous step
    assert int(state.step) == 8 and _resumed_from(workdir) == 4


# XLA's alarm when a compile takes minutes (a loaded machine): a block of these lines.
_SLOW_COMPILE = re.compile(r"^(E\d{4} .*slow_operation_alarm\.cc:\d+\].*|\*+|\[Compiling module "
                           r".*\] Very slow compile\?.*)$")


def _said(err: str) -> list[str]:
    """stderr without the data loader's report (what was cut, how many records were read)
    and XLA's slow-compile alarms."""
    return [x for x in err.splitlines() if x.strip() and not x.startswith(
        ("  cut ", "truncation=", "WARNING:align_jax.data.")) and not _SLOW_COMPILE.match(x)]


def _cli_train(out, *params):
    gin.clear_config()
    try:
        return cli.main(["train", "--gin_file=configs/runs/sft_tiny.gin", f"--output_dir={out}",
                         "--gin_param=entry.train_main.progress=False",
                         "--gin_param=entry.train_main.save_every=1",
                         *[f"--gin_param={p}" for p in params]])
    finally:
        gin.clear_config()


def test_every_checkpoint_unreadable_is_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    assert _cli_train(out, "entry.train_main.num_steps=4") == 0
    for path in (out / "checkpoints").rglob("_METADATA"):
        path.write_text("{not json")
    capfd.readouterr()
    assert _cli_train(out, "entry.train_main.num_steps=5") == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    said = _said(err)
    # The error and the --traceback hint (each step set aside is a logged warning).
    assert len(said) == 2 and said[0].startswith("align-jax train: CorruptCheckpointError: "), \
        err[-3000:]
    assert "no readable checkpoint (steps [2, 3, 4]" in said[0] and "--overwrite" in said[0]
    # A rerun neither starts from scratch over them nor prints more.
    assert _cli_train(out, "entry.train_main.num_steps=5") == 1
    assert "no readable checkpoint" in capfd.readouterr().err


def test_a_failing_checkpoint_save_is_one_line(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGN_JAX_")}
    env.update(PYTHONPATH=str(ROOT), ALIGN_JAX_COMPILATION_CACHE="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    # A file-size limit of 64 KiB: the run's small files fit, a checkpoint's arrays do not, so
    # the save fails in orbax's writer as on a full disk (EFBIG instead of ENOSPC, same path);
    # SIGXFSZ ignored, so that the write fails instead of the process being killed.
    cmd = [sys.executable, "-m", "align_jax.cli", "train", "--gin_file=configs/runs/sft_tiny.gin",
           f"--output_dir={out}", "--gin_param=entry.train_main.progress=False",
           "--gin_param=entry.train_main.num_steps=4", "--gin_param=entry.train_main.save_every=1",
           "--gin_param=entry.train_main.export_hf=False"]
    res = subprocess.run(["bash", "-c", "trap '' XFSZ; ulimit -f 64; exec \"$@\"", "limited",
                          *cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    # It printed 528 lines: orbax's stacks from each writer thread, then TensorStore's
    # "Event loop is closed" stacks (0 to ~200 lines, by thread timing). Now: nothing but the
    # error and the --traceback hint, every time.
    assert "Event loop is closed" not in res.stderr, res.stderr[-3000:]
    said = _said(res.stderr)
    assert len(said) == 2 and said[0].startswith("align-jax train: CheckpointSaveError: "), \
        res.stderr[-3000:]
    assert "saving a checkpoint failed (File too large, errno 27)" in said[0]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed"


def test_only_the_closed_loop_callbacks_of_a_failed_save_are_dropped(monkeypatch):
    """What TensorStore reports after a failed save (its thread calling the closed loop's
    call_soon_threadsafe) is dropped; anything else reaches the previous hook, once."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    checkpoint._quiet_closed_loop_callbacks()
    checkpoint._quiet_closed_loop_callbacks()  # installed once, not chained twice
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        closed = e
    elsewhere = RuntimeError("Event loop is closed")
    try:
        raise elsewhere
    except RuntimeError:
        pass

    def report(exc, tb):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                                 exc_traceback=tb, err_msg=None, object=None))
    # TensorStore calls call_soon_threadsafe from C++: it is the stack's first frame (here
    # the test's own frame comes first, skipped).
    report(closed, closed.__traceback__.tb_next)
    report(elsewhere, elsewhere.__traceback__)
    other = ValueError("unrelated")
    report(other, None)
    assert seen == [elsewhere, other]


def test_only_asyncio_reports_of_failed_orbax_writes_are_dropped():
    import logging

    from align_jax.train import checkpoint as ckpt

    def raised(code: str, filename: str) -> BaseException:
        try:
            exec(compile(f"raise ValueError({code!r})", filename, "exec"))
        except ValueError as e:
            return e

    def record(msg, exc):
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, msg, None,
                                 (type(exc), exc, exc.__traceback__))

    write = raised("Failed writing: File too large [os_error_code='27']",
                   "site-packages/orbax/checkpoint/_src/serialization/serialization.py")
    never = "Task exception was never retrieved\nfuture: <Task finished>"
    assert not ckpt._not_a_failed_orbax_write(record(never, write))
    # Anything else asyncio reports is kept: another message, another origin, another error.
    assert ckpt._not_a_failed_orbax_write(record("Exception in callback", write))
    assert ckpt._not_a_failed_orbax_write(
        record(never, raised("File too large [os_error_code='27']", "mine.py")))
    assert ckpt._not_a_failed_orbax_write(
        record(never, raised("shape mismatch", "site-packages/orbax/checkpoint/x.py")))
