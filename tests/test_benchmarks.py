"""The results page's plotting (benchmarks/plots.py) and the SmolLM2 section's pure helpers."""

import json
import pathlib

import numpy as np
import pytest

from benchmarks import bench_smollm2, plots

ARCHIVE = pathlib.Path(plots.__file__).parent / "archive"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(folder: pathlib.Path, section: str, rows: list[dict], date="2026-12-07") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"section": section, "date": date, "hardware": "test CPU", "rows": rows}
    (folder / f"{section}.json").write_text(json.dumps(payload), encoding="utf-8")


def _fixture(tmp_path):
    results, archive = tmp_path / "results", tmp_path / "archive"
    _write(results, "smollm2", [
        {"kind": "generate", "batch": b, "align_jax tok/s": 10.0 * b, "torch tok/s": 4.0 * b}
        for b in (1, 4, 16)] + [{"kind": "train", "batch": 4, "align_jax s": 1.0}])
    _write(results, "decode_budget", [
        {"attention": a, "budget": n, "cache slots": n + 41, "seconds": s}
        for a, n, s in (("filled", 256, 3.0), ("filled", 2048, 3.1), ("xla", 256, 3.0),
                        ("xla", 2048, 9.0))])
    _write(archive, "bench_lora", [
        {"what": "SFT cpu_5m (4.2M) B=8 T=256 f32", "full step MB": 419, "LoRA step MB": 364},
        {"what": "DPO llama3_1b (1.24B) full FT", "compiled step GB / device": 27.9,
         "vs full FT": 1.0},
        {"what": "DPO llama3_1b (1.24B) LoRA r8, f32 base", "compiled step GB / device": 7.5,
         "vs full FT": 0.27}])
    key = "component (teacher-forced off, steady run)"
    _write(archive, "eval", [{key: "generation", "CPU ms per question": 600.0},
                             {key: "BLEU", "CPU ms per question": 1.5}], date="2026-11-30")
    # In both folders: results/ (this run) must win over archive/.
    _write(archive, "smollm2", [{"batch": 1, "align_jax tok/s": "not a number"}])
    return results, archive


def test_plots_from_a_small_fixture(tmp_path, capsys):
    results, archive = _fixture(tmp_path)
    out = tmp_path / "plots"
    written = plots.make_plots(results, archive, out)
    names = sorted(pathlib.Path(p).name for p in written)
    # No generate.json anywhere: that plot is skipped, the other four are drawn.
    assert names == ["decode_vs_cache.png", "eval_breakdown.png", "lora_memory.png",
                     "tokens_vs_batch_smollm2.png"]
    for p in written:
        data = pathlib.Path(p).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) < 100_000, f"{p} is {len(data)} bytes: keep committed plots small"
    import matplotlib.image
    # 6 x 3.4 inches at 80 dpi
    assert matplotlib.image.imread(out / "lora_memory.png").shape[:2] == (272, 480)
    log = capsys.readouterr().out
    assert "tokens_vs_batch_smollm2.png (results smollm2.json)" in log
    assert "eval_breakdown.png (archive eval.json)" in log
    assert "skipped tokens_vs_batch_tiny.png: no generate.json" in log


def test_plot_functions_read_the_rows(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results, archive = _fixture(tmp_path)
    fig = plt.figure()
    assert plots.plot_tokens(plots.load_section("smollm2", [results]), fig)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines["align_jax"].get_xdata()) == [1, 4, 16]
    assert list(lines["transformers"].get_ydata()) == [4.0, 16.0, 64.0]
    fig = plt.figure()
    assert plots.plot_decode(plots.load_section("decode_budget", [results]), fig)
    assert {ln.get_label() for ln in fig.axes[0].get_lines()} == {"filled", "xla"}
    fig = plt.figure()
    assert not plots.plot_decode({"rows": [{"what": "no cache column"}]}, fig)
    fig = plt.figure()
    assert plots.plot_lora(plots.load_section("bench_lora", [archive]), fig)
    assert len(fig.axes) == 2  # MB (measured small model) and GB (1B shapes) apart
    plt.close("all")


def test_a_bad_results_file_is_named(tmp_path):
    (tmp_path / "eval.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"eval\.json: not valid JSON"):
        plots.load_section("eval", [tmp_path])
    (tmp_path / "eval.json").write_text('{"section": "eval"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"eval\.json: field 'rows'"):
        plots.load_section("eval", [tmp_path])


def test_the_committed_archive_draws(tmp_path):
    written = plots.make_plots(tmp_path / "none", ARCHIVE, tmp_path / "out")
    assert {pathlib.Path(p).name for p in written} >= {
        "decode_vs_cache.png", "tokens_vs_batch_tiny.png", "lora_memory.png",
        "eval_breakdown.png"}


def test_agreement_counts_until_the_first_difference():
    assert bench_smollm2.agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    # After the first difference the contexts differ: the matching 3 does not count.
    assert bench_smollm2.agreement([[1, 9, 3], [5, 6, 7]], [[1, 2, 3], [5, 6, 7]]) == 4 / 6


def test_sft_batch_scores_the_completion_only():
    b = bench_smollm2.sft_batch(100, 2, 16, seed=3)
    assert b["tokens"].shape == (2, 16) and b["tokens"].min() >= 4
    np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])
    # Position t scores token t + 1: positions 3..14 score tokens 4..15 (the last 3/4).
    np.testing.assert_array_equal(b["loss_mask"][0], [0] * 3 + [1] * 12 + [0])
    again = bench_smollm2.sft_batch(100, 2, 16, seed=3)
    np.testing.assert_array_equal(again["tokens"], b["tokens"])
