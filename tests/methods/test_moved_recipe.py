"""A recipe folder moved whole reruns: every stage resumes (completed: nothing to train)."""

import json
import pathlib
import shutil

import gin
import pytest

from align_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = ["cft_steps=2", "sft_steps=2", "dpo_steps=2", "num_samples=1", "max_new_tokens=2",
         "progress=False", "train_on=('files',)", "bertscore_model=None", "oracle_rag=False",
         "yes_no_test=None", "teacher_forced=False", "num_questions=2"]


def _run(out):
    gin.clear_config()
    try:
        return cli.main(["run", "--gin_file=configs/runs/value_alignment_tiny.gin",
                         f"--output_dir={out}"] +
                        [f"--gin_param=value_alignment.value_alignment.{s}" for s in STEPS])
    finally:
        gin.clear_config()


def _trained(out):
    """What the stages trained and exported (bytes), keyed by path inside the folder."""
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for stage in ("cft", "sft", "dpo") for sub in ("checkpoints", "hf")
            for p in sorted((out / stage / sub).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_moved_recipe_folder_reruns_without_training_again(tmp_path, monkeypatch, capsys):
    # A recipe folder that was moved could not be rerun: its stages' settings.json held
    # absolute paths (data, base model) and recipe_base.json the base's absolute path.
    monkeypatch.chdir(ROOT)
    first = tmp_path / "first"
    assert _run(first) == 0
    trained = _trained(first)
    shutil.move(first, tmp_path / "moved")
    moved = tmp_path / "moved"
    capsys.readouterr()
    assert _run(moved) == 0
    out = capsys.readouterr().out
    for stage in ("cft", "sft", "dpo"):
        assert f"{moved / stage}: already completed at step 2" in out, stage
    assert "training it again" not in out
    for stage, base in (("sft", "../cft/hf"), ("dpo", "../sft/hf")):
        assert json.loads((moved / stage / "recipe_base.json").read_text())["init"] == base
    assert _trained(moved) == trained


def _recipe(gin_file, out, params):
    gin.clear_config()
    try:
        return cli.main(["run", f"--gin_file={gin_file}", f"--output_dir={out}"] +
                        [f"--gin_param={p}" for p in params])
    finally:
        gin.clear_config()


def _files(out, *subdirs):
    """What was trained and written (bytes) under `subdirs`, keyed by path inside the folder;
    not the settings and run records, which a rerun rewrites with the folder's new path."""
    rewritten = {"settings.json", "run_info.json", "status.json", "train_summary.json"}
    return {p.relative_to(out).as_posix(): p.read_bytes() for d in subdirs
            for p in sorted((out / d).rglob("*")) if p.is_file() and p.name not in rewritten}


def test_sami_records_models_inside_its_folder_relative_to_it(tmp_path):
    """report.json's model paths: inside the run folder relative to it (unchanged by a
    move), outside it as given (the base model)."""
    from align_jax.methods.sami import _recorded
    out = str(tmp_path / "run")
    assert _recorded(str(tmp_path / "run" / "iter_1" / "train" / "hf"), out) == \
        "iter_1/train/hf"
    assert _recorded(str(tmp_path / "base"), out) == str(tmp_path / "base")
    assert _recorded(str(tmp_path / "run-other"), out) == str(tmp_path / "run-other")


@pytest.mark.slow
def test_a_moved_aligners_folder_reruns_without_training_again(tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.chdir(ROOT)
    params = [f"aligners_recipe.aligners.{p}" for p in (
        "criteria=('ethical',)", "inspector_epochs=1", "inspector_max_length=64",
        "aligner_steps=2", "max_new_tokens=4", "progress=False")]
    first = tmp_path / "first"
    assert _recipe("configs/runs/aligners_tiny.gin", first, params) == 0
    kept = _files(first, "inspectors", "aligner_base", "aligners", "data")
    outputs = {f: (first / f).read_bytes() for f in ("squad.jsonl", "report.json", "report.md")}
    shutil.move(first, tmp_path / "moved")
    moved = tmp_path / "moved"
    capsys.readouterr()
    assert _recipe("configs/runs/aligners_tiny.gin", moved, params) == 0
    said = capsys.readouterr().out
    assert "[aligners] stage" not in said, said  # every stage found done
    assert _files(moved, "inspectors", "aligner_base", "aligners", "data") == kept
    assert {f: (moved / f).read_bytes() for f in outputs} == outputs
