"""SIGTERM/SIGINT in every command: `align_jax.interrupts` itself, and the commands outside a
recipe (sdg, convert, train with a tokenizer trained on the fly) exiting 75 with nothing lost."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import gin
import jax
import pytest
from gguf_files import tiny_llama, write_tiny_gguf

from align_jax import cli, interrupts
from align_jax.models.config import get_config
from align_jax.models.hf import save_hf
from align_jax.models.transformer import init_params
from align_jax.tokenizer_training import train_tokenizer
from align_jax.train.status import EXIT_INTERRUPTED

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_gin(monkeypatch):
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    yield
    gin.clear_config()


def _kill(sig=signal.SIGTERM):
    os.kill(os.getpid(), sig)


def test_a_signal_raises_at_once_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(interrupts.Interrupted, match="SIGTERM during sampling"):
        with interrupts.honoured(), interrupts.phase("sampling"):
            _kill()
            time.sleep(5)  # the handler raises before this returns
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert interrupts.requested() is None  # the record ends with the outermost block


def test_a_signal_during_a_save_is_acted_on_right_after_it():
    done = []
    with pytest.raises(interrupts.Interrupted, match="SIGTERM"):
        with interrupts.honoured():
            with interrupts.deferred():
                _kill()
                time.sleep(0.05)
                done.append("saved")  # the save is not cut short
            done.append("after")  # never reached: raised as the block ended
    assert done == ["saved"]


def test_a_second_ctrl_c_during_a_save_stops_at_once():
    with pytest.raises(interrupts.Interrupted, match="SIGINT"):
        with interrupts.honoured(), interrupts.deferred(act=False):
            _kill(signal.SIGINT)
            assert interrupts.requested() == "SIGINT"
            _kill(signal.SIGINT)
            time.sleep(5)


def test_a_signal_swallowed_by_a_finalizer_is_raised_at_the_next_safe_point():
    """Python prints and drops an exception raised inside __del__: the signal must not be lost
    there (a SAMI run once finished its report after a SIGINT hit such a moment)."""

    class Dropped:
        def __del__(self):
            _kill()
            time.sleep(0.05)

    with pytest.raises(interrupts.Interrupted, match="SIGTERM before report"):
        with interrupts.honoured():
            Dropped()  # its __del__ runs here, receiving the signal
            assert interrupts.requested() == "SIGTERM"
            with interrupts.phase("report"):
                raise AssertionError("the report phase started after SIGTERM")


def test_the_test_hook_signals_on_the_nth_entry_of_a_phase(monkeypatch):
    monkeypatch.setenv(interrupts.HOOK_ENV, "sampling@2:SIGINT")
    entered = []
    with pytest.raises(interrupts.Interrupted, match="SIGINT during sampling"):
        with interrupts.honoured():
            for i in range(3):
                with interrupts.phase("sampling"):
                    entered.append(i)
    assert entered == [0]


def test_handlers_installed_inside_a_phase_leave_the_phase_open():
    """A recipe called from Python (the notebooks) opens a phase with no handlers installed and
    the train loop inside installs its own: their end once emptied the phase stack, so the
    phase's exit popped an empty list (IndexError in sami() and aligners())."""
    with interrupts.phase("train"), interrupts.deferred(act=False):
        with interrupts.honoured(), interrupts.phase("checkpoint_save"):
            assert interrupts._during() == "during checkpoint_save"
        assert interrupts._during() == "during train"
        assert interrupts._state.deferred == 1
    assert interrupts._state.phases == [] and interrupts._state.deferred == 0


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines() if x]
    tok = train_tokenizer(lines, path, vocab_size=400)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=4096,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_hf(cfg, init_params(cfg, jax.random.key(0)), str(path))
    return str(path)


def test_sdg_interrupted_exits_75_and_a_rerun_resumes(tiny_hf, tmp_path, monkeypatch, capsys):
    """It exited 143 (killed) on SIGTERM; now the batch in flight is dropped, the finished
    ones are kept and the rerun does the rest."""
    doc = tmp_path / "code.md"
    paragraphs = (ROOT / "examples" / "values_document.md").read_text().split("\n\n")
    doc.write_text("\n\n".join(p for p in paragraphs if len(p) > 200)[:2500])
    out = tmp_path / "out"
    args = ["sdg", "--gin_file=configs/runs/sdg_document.gin", f"--output_dir={out}",
            f"--gin_param=entry.sdg_main.documents=['{doc}']",
            f"--gin_param=entry.sdg_main.teacher='local:{tiny_hf}'",
            "--gin_param=entry.sdg_main.nex=2", "--gin_param=entry.sdg_main.chunk_tokens=256",
            "--gin_param=entry.sdg_main.overlap=16", "--gin_param=entry.sdg_main.progress=False"]
    monkeypatch.setenv(interrupts.HOOK_ENV, "sdg@2")
    assert cli.main(args) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM during sdg)" in err and "Traceback" not in err
    assert not (out / "summary.json").exists()
    monkeypatch.delenv(interrupts.HOOK_ENV)
    gin.clear_config()
    # The rerun runs every unit to the end. The tiny random teacher writes no parseable
    # record, and a run that keeps none is an error (NoRecordsError) once all units ran.
    assert cli.main(args) == 1
    assert "gave 0 sft/preference records" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["num_chunks"] > 0


def test_gguf_convert_interrupted_exits_75_and_writes_nothing(tmp_path, monkeypatch, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama())
    out = tmp_path / "hf"
    args = ["convert", f"--output_dir={out}", f"--gin_param=convert.convert_main.gguf='{path}'"]
    monkeypatch.setenv(interrupts.HOOK_ENV, "gguf_convert")
    assert cli.main(args) == EXIT_INTERRUPTED
    assert "SIGTERM during gguf_convert" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # no half export


def test_tokenizer_training_interrupted_exits_75_not_130(tmp_path, monkeypatch, capsys):
    """`train` with tokenizer='train:<file>' exited 130 when SIGTERM hit the tokenizer."""
    out = tmp_path / "run"
    args = ["train", "--gin_file=configs/runs/lm_tiny.gin", f"--output_dir={out}",
            "--gin_param=entry.train_main.tokenizer='train:examples/values_document.md'",
            "--gin_param=entry.train_main.num_steps=1",
            "--gin_param=entry.train_main.progress=False"]
    monkeypatch.setenv(interrupts.HOOK_ENV, "tokenizer")
    assert cli.main(args) == EXIT_INTERRUPTED
    assert "SIGTERM during tokenizer" in capsys.readouterr().err
    assert not (out / "tokenizer" / "tokenizer.json").exists()


def test_a_real_sigterm_from_outside_stops_convert_with_75(tmp_path):
    """The signal comes from another process, as a scheduler sends it (the conversion is held
    at its start until the signal is sent: no timing race on a loaded machine)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama())
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGN_JAX_")}
    env.update(PYTHONPATH=str(ROOT), ALIGN_JAX_COMPILATION_CACHE="0")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERT, str(path), str(tmp_path / "hf")], env=env,
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "converting"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "SIGTERM during gguf_convert" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


# `align-jax convert --gguf`, with the conversion held (in Python, so the signal lands in it)
# until the parent has sent its SIGTERM.
_SLOW_CONVERT = """
import sys, time
import align_jax.models.gguf as g
real = g.load_gguf
def held(*a, **k):
    print("converting", flush=True)
    time.sleep(60)
    return real(*a, **k)
g.load_gguf = held
from align_jax import cli
sys.exit(cli.main(["convert", f"--output_dir={sys.argv[2]}",
                   f"--gin_param=convert.convert_main.gguf='{sys.argv[1]}'"]))
"""
