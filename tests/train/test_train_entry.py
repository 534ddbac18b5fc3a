"""Entry tests: `align-jax train` through the real CLI on the tiny model, every run file."""

import glob
import json
import math
import os
import pathlib

import gin
import jax
import numpy as np
import pytest

from align_jax import cli
from align_jax.models.hf import load_hf

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    yield
    gin.clear_config()


def _train(run, out, *params):
    args = ["train", f"--gin_file=configs/runs/{run}.gin", f"--output_dir={out}",
            "--gin_param=entry.train_main.progress=False", *[f"--gin_param={p}" for p in params]]
    assert cli.main(args) == 0
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft"))
    gin.clear_config()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        metrics = _train("sft_tiny", out, "entry.train_main.log_every=1")
    finally:
        os.chdir(cwd)
        gin.clear_config()
    return out, metrics


def test_sft_loss_falls_and_run_folder_is_complete(sft_dir):
    out, metrics = sft_dir
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5, (metrics[0], metrics[-1])
    for name in ("operative_config.gin", "run_info.json", "train_summary.json",
                 "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"):
        assert os.path.exists(os.path.join(out, name)), name
    info = json.load(open(os.path.join(out, "run_info.json")))
    assert info["jax"] and "git_commit" in info
    assert "objective = 'sft'" in open(os.path.join(out, "operative_config.gin")).read()


@pytest.mark.parametrize("reference", ["precomputed", "params"])
def test_dpo_starts_at_ln2_and_learns(sft_dir, tmp_path, reference):
    metrics = _train("dpo_tiny", str(tmp_path), f"HF_CHECKPOINT='{sft_dir[0]}/hf'",
                     f"entry.train_main.reference='{reference}'", "entry.train_main.log_every=1",
                     "entry.train_main.num_steps=12")
    # Policy == reference at step 1: every pair's loss is ln 2.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[-1]["loss"] < math.log(2) - 0.1
    if reference == "precomputed":
        assert glob.glob(str(tmp_path / "cache" / "ref_logps-*.npy"))


@pytest.mark.parametrize("run", ["lm_tiny", "kto_tiny", "sami_tiny"])
def test_other_objectives_learn(tmp_path, run):
    metrics = _train(run, str(tmp_path), "entry.train_main.log_every=1",
                     "entry.train_main.num_steps=12")
    assert metrics[-1]["loss"] < metrics[0]["loss"], (metrics[0], metrics[-1])


def test_every_run_file_parses_against_the_tiny_model():
    from align_jax.generate import server
    from align_jax.methods import aligners_recipe, recipes, sami, value_alignment, value_curve
    from align_jax.sdg import entry as sdg_entry
    from align_jax.train import entry, plan
    def bindings(fn):
        # gin raises for a function that no parsed config has registered yet.
        try:
            return gin.get_bindings(fn)
        except ValueError:
            return {}

    # Overlays are parsed after the file they extend (as the Makefile passes them).
    overlays = {"value_alignment_long.gin": "value_alignment_demo.gin"}
    checked = 0
    for path in sorted(glob.glob(str(ROOT / "configs" / "runs" / "*.gin"))):
        gin.clear_config()
        if path.endswith("train_base.gin"):
            continue
        base = overlays.get(os.path.basename(path))
        files = [str(ROOT / "configs" / "runs" / base), path] if base else [path]
        gin.parse_config_files_and_bindings(
            files, ["MODEL='tiny'", "HF_CHECKPOINT=None"],
            finalize_config=False)
        bound = bindings(entry.train_main)
        if bound:
            assert bound["objective"] in entry.OBJECTIVES, path
            assert bound["mesh"].shape(8), path
        elif bindings(sdg_entry.sdg_main):
            assert bindings(sdg_entry.sdg_main)["task"] in sdg_entry.TASKS, path
        elif bindings(recipes.run):
            recipe = (bindings(value_alignment.value_alignment) or bindings(sami.sami)
                      or bindings(aligners_recipe.aligners) or bindings(value_curve.value_curve))
            assert (recipe.get("document") or recipe.get("constitutions")
                    or recipe.get("aligner_data") or recipe.get("teacher")), path
        elif bindings(plan.plan_main):
            assert bindings(plan.plan_main)["method"] in plan.METHODS, path
            assert bindings(plan.plan_main)["mesh"].shape(8), path
        else:
            assert bindings(server.serve_main)["host"] == "127.0.0.1", path
        checked += 1
    assert checked >= 12


def test_bad_data_is_reported_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    code = cli.main(["train", "--gin_file=configs/runs/sft_tiny.gin",
                     f"--output_dir={tmp_path / 'run'}",
                     f"--gin_param=entry.train_main.data='{bad}'"])
    assert code == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "Traceback" not in err
    # With on_error='skip' the bad line is skipped and the run trains on the rest.
    metrics = _train("sft_tiny", str(tmp_path / "run2"), f"entry.train_main.data='{bad}'",
                     "entry.train_main.on_error='skip'", "entry.train_main.num_steps=5",
                     "entry.train_main.batch_size=8", "entry.train_main.pack=True")
    assert metrics


def test_generate_eval_and_convert_commands(sft_dir, tmp_path, capsys):
    run, _ = sft_dir
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Can I accept a gift from a supplier?"}\n'
                       '{"messages": [{"role": "user", "content": "Who reviews repairs?"}]}\n')
    assert cli.main(["generate", f"--output_dir={tmp_path / 'gen'}",
                     f"--gin_param=entry.generate_main.model_dir='{run}/hf'",
                     f"--gin_param=entry.generate_main.prompts='{prompts}'",
                     "--gin_param=entry.generate_main.max_new_tokens=8"]) == 0
    rows = [json.loads(x) for x in open(tmp_path / "gen" / "completions.jsonl")]
    assert len(rows) == 2 and all(r["finish_reason"] in ("stop", "length") for r in rows)

    gin.clear_config()
    # The step-30 checkpoint converted by `align-jax convert` equals the final HF export.
    assert cli.main(["convert", f"--output_dir={tmp_path / 'conv'}",
                     f"--gin_param=convert.convert_main.run_dir='{run}'"]) == 0
    _, a = load_hf(str(tmp_path / "conv"))
    _, b = load_hf(f"{run}/hf")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)

    gin.clear_config()
    assert cli.main(["eval", f"--output_dir={tmp_path / 'eval'}",
                     f"--gin_param=entry.eval_main.models={{'sft': '{run}/hf'}}",
                     "--gin_param=entry.eval_main.sft_test='examples/sft.jsonl'",
                     "--gin_param=entry.eval_main.preference_test='examples/preference.jsonl'",
                     "--gin_param=entry.eval_main.seq_len=256",
                     "--gin_param=entry.eval_main.num_samples=1",
                     "--gin_param=entry.eval_main.max_new_tokens=4"]) == 0
    report = json.load(open(tmp_path / "eval" / "report.json"))
    row = report["models"]["sft"]
    assert row["answer_nll"]["examples"] == 42 and 0 <= row["preference"]["accuracy"] <= 1


LORA_ALL = ("entry.train_main.lora={'rank': 8, 'alpha': 16, "
            "'targets': ('q', 'k', 'v', 'o', 'gate', 'up', 'down')}")


def test_dpo_with_lora_starts_at_ln2_learns_and_converts(sft_dir, tmp_path):
    out = tmp_path / "run"
    metrics = _train("dpo_tiny", str(out), f"HF_CHECKPOINT='{sft_dir[0]}/hf'", LORA_ALL,
                     "optim.OptimizerConfig.learning_rate=5e-3", "entry.train_main.log_every=1",
                     "entry.train_main.num_steps=15")
    # The reference is the base with adapters off: at step 1 (B = 0) every pair is at ln 2.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # Batches of 8 pairs are noisy: judge the last three steps together.
    last = [m["loss"] for m in metrics[-3:]]
    assert sum(last) / 3 < math.log(2) - 0.05, [m["loss"] for m in metrics]
    assert not (out / "cache").exists()  # no precomputed reference pass
    summary = json.load(open(out / "train_summary.json"))
    assert summary["peft_export"] == str(out / "peft")

    gin.clear_config()
    assert cli.main(["convert", f"--output_dir={tmp_path / 'merged'}",
                     f"--gin_param=convert.convert_main.run_dir='{out}'"]) == 0
    _, a = load_hf(str(tmp_path / "merged"))
    _, b = load_hf(str(out / "hf"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    gin.clear_config()
    assert cli.main(["convert", f"--output_dir={tmp_path / 'peft'}",
                     f"--gin_param=convert.convert_main.run_dir='{out}'",
                     "--gin_param=convert.convert_main.export='peft'"]) == 0
    from safetensors.numpy import load_file
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(out / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
@pytest.mark.parametrize("run", ["sft_tiny", "lm_tiny", "kto_tiny", "sami_tiny"])
def test_other_objectives_learn_with_lora(tmp_path, run):
    metrics = _train(run, str(tmp_path), LORA_ALL, "optim.OptimizerConfig.learning_rate=1e-2",
                     "entry.train_main.log_every=1", "entry.train_main.num_steps=12")
    assert metrics[-1]["loss"] < metrics[0]["loss"], (metrics[0], metrics[-1])
    assert os.path.exists(tmp_path / "peft" / "adapter_model.safetensors")
