"""`align-jax run` stops at an interrupted stage (exit 75, later stages not started) and a rerun
of the same command skips the finished stages and resumes the interrupted one."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import gin
import pytest
from scripted_judge import serve
from tiny_checkpoints import tiny_document_model

from align_jax import cli, interrupts
from align_jax.methods import recipes
from align_jax.methods.value_alignment import value_alignment
from align_jax.train.status import EXIT_INTERRUPTED, RunInterrupted

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_an_interrupted_stage_stops_the_recipe_and_a_changed_base_retrains_later_ones(
        tmp_path, monkeypatch):
    """The stage logic alone, with a fake train_main: interrupted in SFT, DPO never starts;
    rerun, every stage runs once more (completed ones skip inside train_main) and the report
    follows; after SFT is trained again, DPO starts over (overwrite) instead of counting as
    completed on the old SFT model."""
    monkeypatch.chdir(ROOT)
    calls, interrupt = [], {"sft"}

    def fake_train_main(*, output_dir, overwrite, **kwargs):
        calls.append((os.path.basename(output_dir), overwrite))
        if calls[-1][0] in interrupt:
            raise RunInterrupted(f"{output_dir}: interrupted at step 3 of 4")
        export = pathlib.Path(output_dir, "hf", "config.json")
        if overwrite or not export.exists():  # as train_main: a completed run is left alone
            export.parent.mkdir(parents=True, exist_ok=True)
            export.write_text(output_dir)
        return {"status": "completed"}

    def fake_report(out, **kwargs):
        pathlib.Path(out, "report.md").write_text("# report\n")
        return {"samples": {}}

    monkeypatch.setattr("align_jax.methods.value_alignment.train_main", fake_train_main)
    monkeypatch.setattr("align_jax.methods.value_alignment.evaluate_models", fake_report)
    out = tmp_path / "va"
    recipe = functools.partial(value_alignment, document="examples/values_document.md",
                               sft_data="examples/sft.jsonl",
                               preference_data="examples/preference.jsonl", progress=False)
    with pytest.raises(RunInterrupted, match="interrupted at step 3"):
        recipes.run(recipe=recipe, output_dir=str(out))
    assert calls == [("cft", False), ("sft", False)]  # DPO never started
    assert not (out / "report.md").exists()

    calls.clear()
    interrupt.clear()
    recipes.run(recipe=recipe, output_dir=str(out))
    assert calls == [("cft", False), ("sft", False), ("dpo", False)]
    assert (out / "report.md").exists() and (out / "report.json").exists()

    calls.clear()
    # SFT exported anew: the base is recorded by content, so new content (not a new mtime,
    # which a moved or copied folder also gets) is what makes DPO start over.
    (out / "sft" / "hf" / "config.json").write_text("trained again")
    recipes.run(recipe=recipe, output_dir=str(out))
    assert calls == [("cft", False), ("sft", False), ("dpo", True)]


def test_a_signal_outside_a_stage_is_an_interruption(tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    def recipe(*, output_dir):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        raise AssertionError("SIGTERM did not stop the recipe")

    with pytest.raises(RunInterrupted, match=r"\(SIGTERM\) outside a training stage"):
        recipes.run(recipe=recipe, output_dir=str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is before

    def ctrl_c(*, output_dir):
        raise KeyboardInterrupt

    with pytest.raises(RunInterrupted, match=r"\(SIGINT\) outside a training stage"):
        recipes.run(recipe=ctrl_c, output_dir=str(tmp_path))


def _steps(path):
    return [json.loads(line)["step"] for line in open(path)] if path.exists() else []


@pytest.mark.slow
def test_sigterm_in_cft_stops_the_recipe_and_a_rerun_resumes_it(tmp_path):
    """SIGTERM in the c-fine-tune stage of the tiny recipe, in a real `align-jax run`."""
    out = tmp_path / "va"
    settings = ["cft_steps=100", "sft_steps=3", "dpo_steps=3", "batch_size=2",
                "num_samples=1", "max_new_tokens=2", "num_questions=1", "progress=False",
                "bertscore_model=None", "retrieval='tfidf'"]
    cmd = [sys.executable, "-m", "align_jax.cli", "run",
           "--gin_file=configs/runs/value_alignment_tiny.gin", f"--output_dir={out}",
           *[f"--gin_param=value_alignment.value_alignment.{s}" for s in settings]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGN_JAX_")}
    env.update(PYTHONPATH=str(ROOT), ALIGN_JAX_COMPILATION_CACHE="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "cft" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and not _steps(metrics) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the c-fine-tune stage logged a step"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err and "interrupted at step" in err
    status = json.loads((out / "cft" / "status.json").read_text())
    stopped = status["step"]
    assert status["status"] == "interrupted" and 1 <= stopped < 100
    assert (out / "cft" / "checkpoints" / str(stopped)).is_dir()
    assert not (out / "cft" / "hf").exists()
    assert not (out / "sft" / "hf").exists() and not (out / "dpo").exists()
    assert not (out / "report.md").exists()
    logged = _steps(metrics)
    tokenizer_mtime = (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns

    rerun = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    status = json.loads((out / "cft" / "status.json").read_text())
    assert status == {**status, "status": "completed", "step": 100}
    info = json.loads((out / "cft" / "run_info.json").read_text())
    assert info["resumed_from_step"] == stopped
    steps = _steps(metrics)
    # Continued, not restarted: the first run's records are kept and every step is logged once.
    assert steps[:len(logged)] == logged and steps == sorted(set(steps)) and steps[-1] == 100
    assert (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tokenizer_mtime
    for stage in ("cft", "sft", "dpo"):
        assert (out / stage / "hf" / "model.safetensors").exists(), stage
    assert json.loads((out / "report.json").read_text())["models"].keys() == {
        "c-fine-tuned", "sft", "sft+dpo"}


# --- a signal at each phase of each tiny recipe, through the real CLI in this process --------
# The process signals itself as the named phase starts (ALIGN_JAX_SIGNAL_AT, see
# align_jax.interrupts): deterministic on a loaded machine, the real handler path.

def _recipe(out, gin_file, params, *, signal_at=None, monkeypatch):
    if signal_at:
        monkeypatch.setenv(interrupts.HOOK_ENV, signal_at)
    else:
        monkeypatch.delenv(interrupts.HOOK_ENV, raising=False)
    gin.clear_config()
    try:
        return cli.main(["run", f"--gin_file={gin_file}", f"--output_dir={out}",
                         *(f"--gin_param={p}" for p in params)])
    finally:
        gin.clear_config()


def _interrupted(out, code, err, phase):
    assert code == EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err and "exit code 75" in err, err[-2000:]
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"
    assert not (out / "report.json").exists(), f"a report after SIGTERM at {phase}"


VA_TINY = "configs/runs/value_alignment_tiny.gin"
VA_PARAMS = [f"value_alignment.value_alignment.{s}" for s in (
    "cft_steps=2", "sft_steps=2", "dpo_steps=2", "num_samples=1",
    "max_new_tokens=2", "num_questions=1", "progress=False", "bertscore_model=None",
    "retrieval='tfidf'", "yes_no_test=None", "preference_test=None")]
# (phase, slow): each case runs the recipe to the phase, most then to its end (minutes on 2
# CPU cores), so all but one per recipe run with the slow tests. The phases of
# value_alignment_tiny in order; checkpoint_save (its first) ends the c-fine-tune stage
# (save_every = its steps), where a SIGTERM used to be lost.
VA_PHASES = [("tokenizer", True), ("data", True), ("train_cft", True),
             ("checkpoint_save", False), ("train_sft", True), ("checkpoint_save@3", True),
             ("evaluation", True)]


@pytest.mark.parametrize("phase", [pytest.param(p, marks=[pytest.mark.slow] if slow else [])
                                   for p, slow in VA_PHASES])
def test_value_alignment_tiny_stops_at_each_phase_and_resumes(phase, tmp_path, monkeypatch,
                                                              capfd):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "va"
    code = _recipe(out, VA_TINY, VA_PARAMS, signal_at=phase, monkeypatch=monkeypatch)
    _interrupted(out, code, capfd.readouterr().err, phase)
    if phase == "checkpoint_save":
        # The stage's final checkpoint is complete, nothing after it ran.
        status = json.loads((out / "cft" / "status.json").read_text())
        assert status["status"] == "interrupted" and status["step"] == 2
        assert (out / "cft" / "checkpoints" / "2").is_dir()
        assert not (out / "cft" / "hf").exists() and not (out / "sft").exists()
    assert _recipe(out, VA_TINY, VA_PARAMS, monkeypatch=monkeypatch) == 0
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    assert json.loads((out / "report.json").read_text())["models"].keys() == {
        "c-fine-tuned", "sft", "sft+dpo"}
    if phase == "checkpoint_save":
        info = json.loads((out / "cft" / "run_info.json").read_text())
        assert info["resumed_from_step"] == 2  # resumed, not trained again


SAMI_TINY = "configs/runs/sami_recipe_tiny.gin"
SAMI_PHASES = [("sampling", False), ("mi", True), ("train", True), ("checkpoint_save", True),
               ("sampling@2", True), ("mi@2", True), ("judge", True), ("report", True)]


@pytest.mark.parametrize("phase", [pytest.param(p, marks=[pytest.mark.slow] if slow else [])
                                   for p, slow in SAMI_PHASES])
def test_sami_tiny_stops_at_each_phase(phase, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(ROOT)
    base = tiny_document_model(tmp_path / "base")
    with serve(lambda prompt: "Comparison: same.\nFinal Response: A") as (_, url):
        params = [f"HF_CHECKPOINT='{base}'", "sami.sami.num_iterations=1",
                  "sami.sami.max_new_tokens=4", "sami.sami.progress=False",
                  "sami.sami.eval_queries=2",
                  f"sami.sami.judge='openai:{url}'"]
        out = tmp_path / "sami"
        code = _recipe(out, SAMI_TINY, params, signal_at=phase, monkeypatch=monkeypatch)
        _interrupted(out, code, capfd.readouterr().err, phase)
        if phase == "report":
            assert _recipe(out, SAMI_TINY, params, monkeypatch=monkeypatch) == 0
            assert json.loads((out / "status.json").read_text())["status"] == "completed"
            assert [r["iteration"] for r in json.loads(
                (out / "report.json").read_text())["iterations"]] == [0, 1]


ALIGNERS_TINY = "configs/runs/aligners_tiny.gin"
ALIGNERS_PHASES = [("inspector", True), ("train", True), ("checkpoint_save", True),
                   ("squad", True), ("ablation", True), ("report", True)]


@pytest.mark.parametrize("phase", [pytest.param(p, marks=[pytest.mark.slow] if slow else [])
                                   for p, slow in ALIGNERS_PHASES])
def test_aligners_tiny_stops_at_each_phase_and_resumes(phase, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(ROOT)
    params = [f"aligners_recipe.aligners.{p}" for p in (
        "criteria=('ethical',)", "inspector_epochs=1", "inspector_max_length=64",
        "aligner_steps=2", "max_new_tokens=4", "progress=False")]
    out = tmp_path / "aligners"
    code = _recipe(out, ALIGNERS_TINY, params, signal_at=phase, monkeypatch=monkeypatch)
    _interrupted(out, code, capfd.readouterr().err, phase)
    assert not (out / "report.md").exists()
    assert _recipe(out, ALIGNERS_TINY, params, monkeypatch=monkeypatch) == 0
    assert (out / "report.md").exists() and (out / "report.json").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
