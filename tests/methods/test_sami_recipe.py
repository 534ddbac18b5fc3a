"""The SAMI recipe through `align-jax run`: sample, train from the base, measure, repeat."""

import json
import math
import pathlib
import re

import gin
import numpy as np
import pytest
from scripted_judge import serve
from tiny_checkpoints import tiny_document_model

from align_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
_PAIR = re.compile(r"Response A: (.*?)\n\nResponse B: (.*?)\n\nFirst, compare", re.DOTALL)


def _shorter(first: str, second: str) -> str:
    """The scripted judge's rule: the response with fewer words; slot A on a tie."""
    return "B" if len(second.split()) < len(first.split()) else "A"


def _answer(prompt: str) -> str:
    first, second = _PAIR.search(prompt).groups()
    return f"Comparison: one is shorter.\nFinal Response: {_shorter(first, second)}"


@pytest.fixture
def judge_url():
    with serve(_answer) as (handler, url):
        yield handler, url


def _expected_win_rate(new, other):
    """Both orders of each pair under the scripted rule, scored for `new` (eval.judge)."""
    pair = []
    for x, y in zip(new, other):
        ab = {"A": 1.0, "B": 0.0}[_shorter(x, y)]
        ba = {"A": 0.0, "B": 1.0}[_shorter(y, x)]
        pair.append((ab + ba) / 2)
    return float(np.mean(pair))


def _tiny_base(tmp_path):
    """A random tiny model with a tokenizer trained on the example document, saved as HF."""
    return tiny_document_model(tmp_path / "base")


def test_sami_iterations(tmp_path, monkeypatch, judge_url):
    monkeypatch.chdir(ROOT)
    base = _tiny_base(tmp_path)
    handler, url = judge_url
    gin.clear_config()
    out = tmp_path / "sami"
    # The judge behind a real openai: endpoint; the compared model is the base in another
    # prompt format (no example block), so its answers differ from the base's.
    params = [f"HF_CHECKPOINT='{base}'", "sami.sami.num_iterations=2",
              "sami.sami.max_new_tokens=8", "sami.sami.progress=False",
              "sami.sami.eval_queries=4", f"sami.sami.judge='openai:{url}'",
              f"sami.sami.compare_to='{base}'", "sami.sami.compare_to_format='plain'",
              "sami.sami.optimizer='rmsprop'"]
    code = cli.main(["run", "--gin_file=configs/runs/sami_recipe_tiny.gin",
                     f"--output_dir={out}"] + [f"--gin_param={p}" for p in params])
    gin.clear_config()
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    # Held out: every query under all 8 pool constitutions; the bound is at most log 8, the
    # reference estimate (not a bound) at least the bound.
    assert all(r["mi_constitutions"] == 8 and math.isfinite(r["mi_bound"])
               and r["mi_bound"] <= math.log(8) + 1e-5
               and r["mi_reference"] >= r["mi_bound"] - 1e-4 for r in rows)
    assert report["eval_constitution"] == "c000" and report["example_format"]
    for k in (1, 2):
        # Iteration k trains the base model for 2k steps on 2k batches of fresh samples.
        metrics = [json.loads(x) for x in open(out / f"iter_{k}" / "train" / "metrics.jsonl")]
        assert metrics[-1]["step"] == 2 * k
        # RMSprop (the paper's Mixtral optimizer) with torch's decay, as the recipe chose.
        settings = json.loads((out / f"iter_{k}" / "train" / "settings.json").read_text())
        assert settings["optimizer"]["name"] == "rmsprop"
        assert settings["optimizer"]["rms_decay"] == 0.99
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
        assert set(lengths) == set(names) and all(v["n"] == 4 for v in lengths.values())
        assert r["eval_response_tokens"]["n"] == 4
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
        assert r["mi_bound_token_mean"] <= math.log(8) + 1e-5 and r["mi_bound_stderr"] >= 0
    # Win rates: every held-out query answered under c000 by each model, judged in both
    # orders against the base (iterations >= 1) and the compared model (every iteration);
    # the report's numbers are what the scripted rule gives on the saved responses.
    texts = lambda f: [json.loads(x)["texts"][0] for x in open(out / "eval" / f)]  # noqa: E731
    compare = texts("compare_to_c000.jsonl")
    base_eval = texts("iter_0_c000.jsonl")
    for r in rows:
        mine = texts(f"iter_{r['iteration']}_c000.jsonl")
        assert len(mine) == 4
        w = r["win_rate_vs_compare"]
        assert w["win_rate"] == pytest.approx(_expected_win_rate(mine, compare))
        assert w["parse_failures"] == 0 and w["n_pairs"] == 4
        assert {"lc_stratified", "lc_win_rate", "position_bias"} <= set(w)
        if r["iteration"] == 0:
            assert "win_rate_vs_base" not in r
        else:
            assert r["win_rate_vs_base"]["win_rate"] == pytest.approx(
                _expected_win_rate(mine, base_eval))
    # The judge saw the paper's layout with its system prompt and the eval constitution.
    first = handler.seen[0]["messages"]
    assert first[0]["role"] == "system" and "Final Response:" in first[1]["content"]
    assert "Assistant constitution:\n1. Answer the user's actual request" in first[1]["content"]
    assert len(handler.seen) == 2 * 4 * (3 + 2)  # both orders; 3 vs compare, 2 vs base
    md = (out / "report.md").read_text()
    assert "reference estimate (not a bound)" in md and "LC strat." in md
    assert "Win rates under the constitution 'c000'" in md


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
        assert 0.0 <= wr["win_rate"] <= 1.0 and 0.0 <= wr["position_bias"] <= 1.0
        assert 0.0 <= wr["lc_win_rate"] <= 1.0 and wr["n_pairs"] == 4
    assert report["eval_constitution"] == "concise"
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "Win rates under the constitution 'concise'" in md and "LC strat." in md
    assert "tokens: verbose (cut)" in md and "+- se" in md


@pytest.mark.slow
def test_sami_refuses_another_heldout_split_after_an_iteration(tmp_path, monkeypatch, capsys):
    """Queries that iteration 1 trained on must not become held out: a rerun with another
    eval_queries is refused in one line, before anything is sampled or written."""
    monkeypatch.chdir(ROOT)
    base = _tiny_base(tmp_path)
    params = [f"HF_CHECKPOINT='{base}'", "sami.sami.num_iterations=1",
              "sami.sami.steps_per_iteration=1", "sami.sami.max_new_tokens=4",
              "sami.sami.progress=False"]
    _run(tmp_path, "split", params)
    out = tmp_path / "split"
    report = (out / "report.json").read_bytes()
    gin.clear_config()
    capsys.readouterr()
    code = cli.main(["run", "--gin_file=configs/runs/sami_recipe_tiny.gin",
                     f"--output_dir={out}"]
                    + [f"--gin_param={p}" for p in params + ["sami.sami.eval_queries=4"]])
    gin.clear_config()
    assert code == 1
    err = capsys.readouterr().err.splitlines()[0]
    assert "sami.eval_queries was 8 when iter_1 trained, now 4" in err, err
    assert (out / "report.json").read_bytes() == report
