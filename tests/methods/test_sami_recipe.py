"""The SAMI recipe through `align-jax run`: sample, train from the base, measure, repeat."""

import json
import math
import pathlib

import gin
import pytest
from tiny_checkpoints import tiny_document_model

from align_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tiny_base(tmp_path):
    """A random tiny model with a tokenizer trained on the example document, saved as HF."""
    return tiny_document_model(tmp_path / "base")


def test_sami_iterations(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = _tiny_base(tmp_path)
    gin.clear_config()
    out = tmp_path / "sami"
    params = [f"HF_CHECKPOINT='{base}'", "sami.sami.num_iterations=2",
              "sami.sami.max_new_tokens=8", "sami.sami.progress=False"]
    code = cli.main(["run", "--gin_file=configs/runs/sami_recipe_tiny.gin",
                     f"--output_dir={out}"] + [f"--gin_param={p}" for p in params])
    gin.clear_config()
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["mi_bound"]) and r["mi_bound"] <= math.log(2) + 1e-5
               for r in rows)
    for k in (1, 2):
        # Iteration k trains the base model for 2k steps on 2k batches of fresh samples.
        metrics = [json.loads(x) for x in open(out / f"iter_{k}" / "train" / "metrics.jsonl")]
        assert metrics[-1]["step"] == 2 * k
        # The iteration's model is its export; its orbax checkpoints are removed.
        assert (out / f"iter_{k}" / "train" / "hf" / "config.json").exists()
        assert not (out / f"iter_{k}" / "train" / "checkpoints").exists()
        data = [json.loads(x) for x in open(out / f"iter_{k}" / "data.jsonl")]
        assert len(data) == 2 * k * 8 and all(len(r["responses"]) == 2 for r in data)
        assert all(c0 != c1 for c0, c1 in (r["constitutions"] for r in data))
    # Iteration 2 sampled with iteration 1's model, from the other half of the queries.
    q1 = {r["prompt"] for r in map(json.loads, open(out / "iter_1" / "data.jsonl"))}
    q2 = {r["prompt"] for r in map(json.loads, open(out / "iter_2" / "data.jsonl"))}
    assert not q1 & q2
    assert (out / "report.png").exists() and (out / "report.md").exists()
    # A response cut at the budget is kept as the sampled ids (no EOS appended), one that
    # ended as text; the held-out lengths per constitution count both.
    for r in data:
        for resp, cut, n in zip(r["responses"], r["truncated"], r["response_tokens"]):
            assert (isinstance(resp, list) and len(resp) == n == 8) if cut else \
                isinstance(resp, str)
    names = [json.loads(x)["id"] for x in open(ROOT / "examples" / "constitutions.jsonl")]
    for r in rows:
        lengths = r["response_tokens_by_constitution"]
        assert set(lengths) <= set(names) and sum(v["n"] for v in lengths.values()) == 2 * 8
        assert all(0 < v["mean"] <= 8 and 0 <= v["truncated"] <= v["n"]
                   for v in lengths.values())
        assert {"sample", "mi"} <= set(r["phase_seconds"]) <= {"train", "sample", "mi", "judge"}
        assert ("train" in r["phase_cpu_seconds"]) == (r["iteration"] > 0)
    # init='base' (the default): every iteration starts from the base parameters, ends elsewhere.
    assert report["init"] == "base"
    base_sum = rows[0]["params_checksum"]
    for r in rows[1:]:
        assert r["init_from"] == str(base) and r["init_checksum"] == base_sum
        assert r["params_checksum"] != base_sum
        assert r["mi_bound_token_mean"] <= math.log(2) + 1e-5 and r["mi_bound_stderr"] >= 0


def _run(tmp_path, name, params, gin_file="configs/runs/sami_recipe_tiny.gin"):
    gin.clear_config()
    out = tmp_path / name
    code = cli.main(["run", f"--gin_file={gin_file}", f"--output_dir={out}"]
                    + [f"--gin_param={p}" for p in params])
    gin.clear_config()
    assert code == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_sami_latest_continues_from_the_previous_iterate(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = _tiny_base(tmp_path)
    rows = _run(tmp_path, "latest", [f"HF_CHECKPOINT='{base}'", "sami.sami.num_iterations=3",
                                     "sami.sami.steps_per_iteration=1", "sami.sami.init='latest'",
                                     "sami.sami.max_new_tokens=4", "sami.sami.progress=False"]
                )["iterations"]
    assert rows[1]["init_checksum"] == rows[0]["params_checksum"]
    for k in (2, 3):
        # Iteration k starts from iteration k-1's exported model (a fresh optimizer: the
        # train run of iteration k starts at step 0 and ends at step k).
        assert rows[k]["init_from"] == rows[k - 1]["model"]
        assert rows[k]["init_checksum"] == rows[k - 1]["params_checksum"]
        assert rows[k]["init_checksum"] != rows[0]["params_checksum"]


@pytest.mark.slow
def test_sami_demo_runs_end_to_end(tmp_path, monkeypatch, smollm2_dir):
    """configs/runs/sami_demo.gin on SmolLM2-135M-Instruct with fewer steps and tokens."""
    monkeypatch.chdir(ROOT)
    # The tests fake 8 CPU devices in one process: the demo's cpu mesh would replicate the
    # parameters and AdamW state on each (8 x ~2 GB), so shard them (fsdp) over the 8 instead;
    # batch 8 fills the fsdp axis.
    report = _run(tmp_path, "demo", ["sami.sami.num_iterations=1", "sami.sami.max_new_tokens=8",
                                     "sami.sami.eval_queries=4", "sami.sami.batch_size=8",
                                     "sharding.MeshSpec.data=1", "sharding.MeshSpec.fsdp=-1",
                                     "sami.sami.rules='fsdp'", "sami.sami.progress=False"],
                  gin_file="configs/runs/sami_demo.gin")
    rows = report["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert math.isfinite(r["mi_bound"]) and r["mi_bound"] <= math.log(2) + 1e-5
        assert math.isfinite(r["mi_bound_stderr"]) and r["mean_response_tokens"] > 0
        assert set(r["response_tokens_by_constitution"]) == {"concise", "verbose"}
    for r in rows[1:]:
        wr = r["win_rate_vs_base"]
        assert 0.0 <= wr["win_rate"] <= 1.0 and set(wr["by_constitution"]) == {"concise",
                                                                               "verbose"}
        assert 0.0 <= wr["position_bias"] <= 1.0
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "win rate vs base: concise" in md and "tokens: verbose (cut)" in md and "+- se" in md
