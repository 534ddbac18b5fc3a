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
