"""The aligners recipe end to end through `align-jax run` on the example data (tiny models)."""

import json
import pathlib
import re

import gin
import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from scripted_judge import serve

from align_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "--gin_file=configs/runs/aligners_tiny.gin"
# What marks each stage done (the recipe skips a stage whose file exists), per criterion or not.
STAGE_FILES = ("data/aligner.jsonl", "data/inspector.jsonl", "aligner_base/aligner_markers.json",
               "responses.jsonl", "squad.jsonl", "ablation.jsonl", "report.md")
_PAIR = re.compile(r"###Response A:\n(.*?)\n\n###Response B:\n(.*?)\n\n###Rubric", re.DOTALL)


def _longer(first: str, second: str) -> str:
    """The scripted judge's rule: the response with more words; slot A on a tie."""
    return "B" if len(second.split()) > len(first.split()) else "A"


def _answer(prompt: str) -> str:
    return f"Feedback: one says more.\n[RESULT] {_longer(*_PAIR.search(prompt).groups())}"


def _expected(aligned, original):
    """Win rate of aligned over original under the rule, both orders (eval.judge)."""
    return float(np.mean([({"A": 1.0, "B": 0.0}[_longer(a, o)]
                           + {"A": 0.0, "B": 1.0}[_longer(o, a)]) / 2
                          for a, o in zip(aligned, original)]))
CRITERION_FILES = ("inspectors/{}/metrics.json", "aligners/{}/hf/config.json")


@pytest.fixture
def cli_compilation_cache(tmp_path, monkeypatch):
    """The persistent compilation cache `align-jax run` keeps (conftest turns it off for
    in-process runs), in a temporary folder: as for a user, the second criterion's aligner
    loads the train step the first one compiled. Off again afterwards."""
    monkeypatch.delenv("ALIGN_JAX_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("ALIGN_JAX_CACHE", str(tmp_path / "cache"))
    yield
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def _run(out, *params):
    gin.clear_config()
    try:
        return cli.main(["run", CONFIG, f"--output_dir={out}",
                         "--gin_param=aligners_recipe.aligners.progress=False",
                         *(f"--gin_param=aligners_recipe.aligners.{p}" for p in params)])
    finally:
        gin.clear_config()


def _check_run(out: pathlib.Path, criteria: list[str]) -> tuple[dict, list[dict], str]:
    """Checks a finished run against its own squad.jsonl and the example rows; returns
    (report.json, squad rows, report.md)."""
    given = [json.loads(x) for x in open(ROOT / "examples" / "squad_responses.jsonl")]
    rows = [json.loads(x) for x in open(out / "squad.jsonl")]
    # One row per input row, in order.
    assert [(r["input"], r["response"]) for r in rows] == [(g["input"], g["response"])
                                                           for g in given]
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["pass_before"]) == sorted(criteria) and report["rows"] == len(given)
    threshold = report["threshold"]
    order = rows[0]["order"]
    assert sorted(order) == sorted(criteria)
    for r in rows:
        assert [s["criterion"] for s in r["trace"]] == order
        # An aligner ran on a row exactly when the row's score for its criterion was below
        # the threshold as its stage began; untouched rows keep their response.
        ran = [s["criterion"] for s in r["trace"] if s["before"][s["criterion"]] < threshold]
        assert [s["criterion"] for s in r["trace"] if s["ran"]] == ran == r["applied"]
        if not ran:
            assert r["aligned"] == r["response"]
    md = (out / "report.md").read_text()
    assert "| criterion | before | after | rows touched by its aligner |" in md
    for c in criteria:
        # Pass rates recounted from the per-row traces: before the first stage, after the last.
        before = sum(r["trace"][0]["before"][c] >= threshold for r in rows) / len(rows)
        after = sum(r["trace"][-1]["after"][c] >= threshold for r in rows) / len(rows)
        touched = sum(c in r["applied"] for r in rows)
        line = next(x for x in md.splitlines() if x.startswith(f"| {c} | "))
        assert line == f"| {c} | {before:.3f} | {after:.3f} | {touched} |"
        assert (report["pass_before"][c], report["pass_after"][c]) == (before, after)
    markers = json.loads((out / "aligner_base" / "aligner_markers.json").read_text())
    assert markers["markers"] == ["[INPUT]", "[INIT]", "[ALIGNED]", "[DONE]"]
    return report, rows, md


def _check_resume(out: pathlib.Path, criteria: list[str], capsys, *params) -> None:
    """A rerun finds every stage done: nothing is rewritten but the report, which is the same."""
    files = [*STAGE_FILES, *(f.format(c) for f in CRITERION_FILES for c in criteria)]
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    md = (out / "report.md").read_text()
    (out / "report.md").unlink()
    capsys.readouterr()
    assert _run(out, *params) == 0
    said = capsys.readouterr().out
    assert "stage" not in said, said
    assert {f: (out / f).stat().st_mtime_ns for f in files if f != "report.md"} == \
        {f: t for f, t in stamps.items() if f != "report.md"}
    assert (out / "report.md").read_text() == md


def test_aligners_tiny_cli_end_to_end_small_and_resumes(tmp_path, monkeypatch, capsys,
                                                        cli_compilation_cache):
    """`align-jax run --gin_file=configs/runs/aligners_tiny.gin`, two criteria, the training
    cut to a few steps (the pipeline, not the models' quality), over all 20 example rows; each
    aligner also on every row (the ablation), and a scripted judge behind a real openai:
    endpoint comparing every setting with the original responses."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    criteria = ["ethical", "helpful"]
    with serve(_answer) as (handler, url):
        params = ("criteria=('ethical', 'helpful')", "inspector_epochs=1",
                  "inspector_max_length=64", "aligner_steps=2", "max_new_tokens=8",
                  f"judge='openai:{url}'")
        assert _run(out, *params) == 0
        said = capsys.readouterr().out
        for stage in ("inspector ethical", "inspector helpful", "aligner_base",
                      "aligner ethical", "aligner helpful", "squad", "ablation", "judge"):
            assert f"[aligners] stage {stage}" in said, said
        assert "factuality" not in said
        for f in [*STAGE_FILES, "judge.json",
                  *(f.format(c) for f in CRITERION_FILES for c in criteria)]:
            assert (out / f).exists(), f
        assert not (out / "inspectors" / "factuality").exists()
        report, rows, md = _check_run(out, criteria)
        _check_judged(out, report, rows, md, criteria, handler)
        _check_resume(out, criteria, capsys, *params)
        # The rerun asked the judge nothing (judge.json holds this judge's answers).
        assert len(handler.seen) == 2 * len(rows) * 3


def _check_judged(out, report, rows, md, criteria, handler):
    ablation = [json.loads(x) for x in open(out / "ablation.jsonl")]
    assert [(a["input"], a["response"]) for a in ablation] == [(r["input"], r["response"])
                                                               for r in rows]
    threshold = report["threshold"]
    for c in criteria:
        # Every row rewritten by aligner c; every inspector re-scored the rewrites.
        assert all(set(a["aligned"]) == set(criteria) for a in ablation)
        for k in criteria:
            want = np.mean([a["scores"][c][k] >= threshold for a in ablation])
            assert report["ablation_pass"][c][k] == pytest.approx(want)
    judged = report["judge"]
    assert judged["template"] == "pairwise" and judged["settings"] == sorted(
        ["squad"] + [f"ablation:{c}" for c in criteria])
    original = [r["response"] for r in rows]
    settings = {"squad": [r["aligned"] for r in rows],
                **{f"ablation:{c}": [a["aligned"][c] for a in ablation] for c in criteria}}
    for name, aligned in settings.items():
        w = judged["win_rates"][name]
        assert w["win_rate"] == pytest.approx(_expected(aligned, original)), name
        assert w["n_judgements"] == 2 * len(rows) and w["parse_failures"] == 0
        assert w["rows_changed"] == sum(a != o for a, o in zip(aligned, original))
        line = next(x for x in md.splitlines() if x.startswith(f"| {name} | "))
        assert f"{w['win_rate']:.3f} +- " in line and f"| {w['position_bias']:.2f} |" in line
    # Both orders of every pair were asked, under the pairwise layout with the rubric.
    shown = [_PAIR.search(s["messages"][-1]["content"]).groups() for s in handler.seen[:40]]
    assert sorted(shown) == sorted([(a, o) for a, o in zip(settings["squad"], original)]
                                   + [(o, a) for a, o in zip(settings["squad"], original)])
    assert "## Aligned vs original: each setting judged" in md


@pytest.mark.slow
def test_aligners_tiny_runs_end_to_end_and_resumes(tmp_path, monkeypatch, capsys,
                                                   cli_compilation_cache):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    criteria = ["ethical", "factuality", "helpful"]
    assert _run(out) == 0
    report, rows, _ = _check_run(out, criteria)
    # The squad only improves what the inspectors see on rows they trained on.
    assert sum(report["pass_after"].values()) > sum(report["pass_before"].values())
    assert sum(len(r["applied"]) for r in rows) == sum(report["rows_touched"].values()) > 0
    # Greedy aligners reproduce y' for their own training triples.
    triples = [json.loads(x) for x in open(ROOT / "examples" / "aligner.jsonl")]
    reproduced = [r["aligned"] == t["aligned_response"] for r, t in zip(rows, triples)
                  if r["applied"] and r["applied"][0] == t["criterion"]]
    assert reproduced and sum(reproduced) >= 0.8 * len(reproduced), reproduced
    for c in criteria:
        assert (out / "inspectors" / c / "reliability.png").exists()
        assert (out / "aligners" / c / "hf" / "model.safetensors").exists()
    _check_resume(out, criteria, capsys)
