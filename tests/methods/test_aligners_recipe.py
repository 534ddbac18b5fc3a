"""The aligners recipe end to end through `align-jax run` on the example data (tiny models)."""

import json
import pathlib

import gin
import pytest

from align_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_aligners_tiny_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    args = ["run", "--gin_file=configs/runs/aligners_tiny.gin", f"--output_dir={out}",
            "--gin_param=aligners_recipe.aligners.progress=False"]
    gin.clear_config()
    assert cli.main(args) == 0
    gin.clear_config()
    report = json.loads((out / "report.json").read_text())
    criteria = ["ethical", "factuality", "helpful"]
    assert sorted(report["pass_before"]) == criteria and report["rows"] == 20
    md = (out / "report.md").read_text()
    assert "| criterion | before | after |" in md
    for c in criteria:
        line = next(x for x in md.splitlines() if x.startswith(f"| {c} | "))
        before, after = (float(v) for v in line.split("|")[2:4])
        assert (before, after) == (round(report["pass_before"][c], 3),
                                   round(report["pass_after"][c], 3))
    # The squad only improves what the inspectors see on rows they trained on.
    assert sum(report["pass_after"].values()) > sum(report["pass_before"].values())
    rows = [json.loads(x) for x in open(out / "squad.jsonl")]
    assert sum(len(r["applied"]) for r in rows) == sum(report["rows_touched"].values()) > 0
    # Greedy aligners reproduce y' for their own training triples.
    triples = [json.loads(x) for x in open(ROOT / "examples" / "aligner.jsonl")]
    reproduced = [r["aligned"] == t["aligned_response"] for r, t in zip(rows, triples)
                  if r["applied"] and r["applied"][0] == t["criterion"]]
    assert reproduced and sum(reproduced) >= 0.8 * len(reproduced), reproduced
    for c in criteria:
        assert (out / "inspectors" / c / "reliability.png").exists()
        assert (out / "aligners" / c / "hf" / "model.safetensors").exists()
    # A rerun finds every stage done and rewrites the same report.
    stamp = (out / "squad.jsonl").stat().st_mtime
    (out / "report.md").unlink()
    assert cli.main(args) == 0
    gin.clear_config()
    assert (out / "squad.jsonl").stat().st_mtime == stamp
    assert (out / "report.md").read_text() == md
