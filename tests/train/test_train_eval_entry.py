"""`align-jax train` with an eval set, through the real CLI on the tiny model."""

import glob
import json
import math
import os
import pathlib

import gin
import jax
import numpy as np
import pytest
from tiny_checkpoints import tiny_document_model

from align_jax import cli
from align_jax.models.hf import load_hf
from align_jax.train import load_params

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
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # one tiny SFT run of 6 steps with 4 evaluations: about 30 s
def test_sft_with_eval_set_keep_best_and_closing_line(tmp_path, capsys):
    out = tmp_path / "run"
    records = _train("sft_tiny", out, "entry.train_main.num_steps=6",
                     "evaluation.EvalConfig.data='examples/sft.jsonl'",
                     "evaluation.EvalConfig.every=2", "evaluation.EvalConfig.keep_best=True",
                     "entry.train_main.save_every=100", "entry.train_main.keep=1")
    evals = {r["step"]: r for r in records if "eval/loss" in r}
    assert sorted(evals) == [0, 2, 4, 6]
    assert all(evals[s]["eval/num_tokens"] == evals[0]["eval/num_tokens"] > 0 for s in evals)
    # The set's perplexity is exp of its loss (float32 per-batch losses: a few ulps).
    for r in evals.values():
        assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]), rel=1e-5)
    summary = json.loads((out / "train_summary.json").read_text())
    ev = summary["evaluation"]
    best = min((2, 4, 6), key=lambda s: (evals[s]["eval/loss"], s))
    assert ev["best_step"] == best == ev["exported_step"]
    assert ev["best_value"] == pytest.approx(evals[best]["eval/loss"], rel=1e-6)
    stdout = capsys.readouterr().out
    line = [x for x in stdout.splitlines() if x.startswith("align-jax train: ")][-1]
    assert f"hf/ -> {out / 'hf'}" in line and f"the best evaluation, step {best}" in line
    # The export is the best step's params (bf16 or f32 as the checkpoint's, bit for bit).
    _, exported = load_hf(str(out / "hf"))
    for a, b in zip(jax.tree.leaves(exported),
                    jax.tree.leaves(load_params(out / "checkpoints", step=best))):
        np.testing.assert_array_equal(np.asarray(a), b)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "completed" and status["message"] is None


@pytest.mark.slow  # a precompute pass over both sets, then 4 DPO steps: about 40 s
def test_dpo_eval_set_gets_precomputed_reference_logps(tmp_path):
    base = tiny_document_model(tmp_path / "base")
    out = tmp_path / "dpo"
    records = _train("dpo_tiny", out, f"HF_CHECKPOINT='{base}'",
                     "entry.train_main.reference='precomputed'", "entry.train_main.num_steps=4",
                     "evaluation.EvalConfig.data='examples/preference_heldout.jsonl'",
                     "evaluation.EvalConfig.metric='accuracy'")
    evals = {r["step"]: r for r in records if "eval/loss" in r}
    assert sorted(evals) == [0, 4]
    # The eval set's reference log-probs come from the same reference (the init) as the
    # training set's, computed by the precompute pass: at step 0 each pair's loss is ln 2
    # up to the float32 difference of two programs computing the same log-probs.
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(evals[0]["eval/margin"]) < 1e-4
    assert len(glob.glob(str(out / "cache" / "ref_logps-*.npy"))) == 2  # train and eval
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["evaluation"]["metric"] == "accuracy"
    assert summary["evaluation"]["best_step"] == 4
