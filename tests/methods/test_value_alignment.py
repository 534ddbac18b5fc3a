"""The main job through `align-jax run` (what `make demo` runs), with fewer steps."""

import json
import math
import os
import pathlib
import subprocess
import sys

import gin
import pytest

from align_jax import cli
from align_jax.eval.retrieval import Retriever, with_retrieval

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_retriever_finds_the_chunk_that_shares_the_terms():
    r = Retriever(["Gifts from suppliers must be reported to the office.",
                   "Roof work needs two people and a harness.",
                   "Members get a written quote before any repair."])
    assert r.search("Can I accept a gift from a supplier?")[0][0] == 0
    assert r.search("working alone on a roof")[0][0] == 1
    (rec,) = with_retrieval([{"prompt": "Do members get a quote?"}], r)
    assert "written quote" in rec["prompt"] and rec["prompt"].endswith("Do members get a quote?")
    with pytest.raises(ValueError, match="no chunks"):
        Retriever([])


YES_NO = [{"question": "May I stop unsafe work without asking my coordinator?",
           "answer": "yes", "pair_id": 1},
          {"question": "May I go up on a roof alone if the job is quick?", "answer": "no",
           "pair_id": 1},
          {"question": "Must I report a gift from a supplier?", "answer": "yes"},
          {"question": "Can I give a member's address to the police myself?", "answer": "no"}]


# Held-out questions grounded by a quote of the document (`evidence`), by the rule of a yes/no
# record (`rule`), and one by nothing (no oracle row).
SFT_TEST = [
    {"prompt": "Can I take cash from a supplier as a thank-you?",
     "completion": "No. Do not accept cash, vouchers or any gift worth more than thirty euros.",
     "evidence": "Do not accept cash, vouchers or any gift worth more than thirty euros"},
    {"prompt": "May I go up on a roof by myself?", "completion": "No, never work on a roof alone.",
     "rule": "never work on a roof alone"},
    {"prompt": "How do I fill in my timesheet?",
     "completion": "Log your hours as you actually worked them.",
     "evidence": "Log your hours as you actually worked them"},
    {"prompt": "What colour are the cooperative's vans?", "completion": "The code does not say."},
]


def test_recipe_runs_every_stage_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    out = tmp_path / "demo"
    yes_no = tmp_path / "yes_no.jsonl"
    yes_no.write_text("".join(json.dumps(r) + "\n" for r in YES_NO))
    sft_test = tmp_path / "sft_test.jsonl"
    sft_test.write_text("".join(json.dumps(r) + "\n" for r in SFT_TEST))
    steps = ["cft_steps=12", "sft_steps=12", "dpo_steps=8", "num_samples=1", "max_new_tokens=4",
             "progress=False", "preference_test='examples/preference_heldout.jsonl'",
             f"yes_no_test='{yes_no}'", "yes_no_max_new_tokens=3", f"sft_test='{sft_test}'",
             "bertscore_layer=3", "train_on=('files',)"]
    code = cli.main(["run", "--gin_file=configs/runs/value_alignment_tiny.gin",
                     f"--output_dir={out}"] +
                    [f"--gin_param=value_alignment.value_alignment.{s}" for s in steps])
    gin.clear_config()
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"c-fine-tuned", "sft", "sft+dpo"}
    for row in report["models"].values():
        assert math.isfinite(row["answer_nll"]["nll_per_token"])
        assert 0.0 <= row["preference"]["accuracy"] <= 1.0
    assert "answer_nll_rag" in report["models"]["sft"]
    assert 0.0 <= report["implicit_reward"]["accuracy"] <= 1.0
    # Every model answers with and without the retrieved chunk, scored against the references.
    metrics = report["generation"]["metrics"]
    assert set(metrics) == {f"{m}{rag}" for m in report["models"] for rag in ("", " + RAG")}
    assert all(0 <= m["bleu"] <= 100 and 0 <= m["rougeL"] <= 1 for m in metrics.values())
    for name in ("report.md", "report.png", "report.csv", "metrics.png",
                 "dpo/hf/model.safetensors", "data/sft_test.jsonl"):
        assert (out / name).exists(), name
    # Held-out prompts never appear in training data.
    train = {json.loads(x)["prompt"] for x in open(out / "data" / "sft_train.jsonl")}
    test = {json.loads(x)["prompt"] for x in open(out / "data" / "sft_test.jsonl")}
    assert test and not (train & test)
    # A given held-out preference file is the preference test set; every other pair trains.
    def prompts(path):
        return [json.loads(x)["prompt"] for x in open(path)]
    heldout = prompts(ROOT / "examples" / "preference_heldout.jsonl")
    assert prompts(out / "data" / "preference_test.jsonl") == heldout
    pref_train = prompts(out / "data" / "preference_train.jsonl")
    assert pref_train == prompts(ROOT / "examples" / "preference.jsonl")
    assert not set(pref_train) & set(heldout)
    assert report["models"]["sft"]["preference"]["examples"] == len(heldout)
    # The evidence sections: shortcut rules on the same held-out pairs, the yes/no questions
    # answered by every system, intervals for every metric, differences against the first
    # model (a from-scratch run has no base model).
    assert report["base_system"] == "c-fine-tuned"
    ev = report["preference_evidence"]
    assert ev["pairs"] == len(heldout) and ev["best_shortcut"] in ev["rows"]
    assert "implicit reward (sft+dpo vs sft)" in ev["comparisons"]
    yn = report["yes_no"]
    assert yn["questions"] == 4 and yn["yes_share"] == 0.5 and yn["max_new_tokens"] == 3
    assert set(yn["rows"]) == {"always yes", "always no", *metrics}
    for name, row in yn["rows"].items():
        acc = row["accuracy"]
        assert 0 <= acc["ci_low"] <= acc["estimate"] <= acc["ci_high"] <= 1, name
        assert 0 <= row["unclear"]["estimate"] <= 1
    assert yn["rows"]["always no"]["accuracy"]["estimate"] == 0.5
    assert yn["rows"]["always yes"]["accuracy"]["estimate"] == 0.5
    for system, cells in report["intervals"].items():
        assert set(cells) == {"bleu", "rougeL", "bertscore_f1", "answer_nll",
                              "preference_accuracy", "yes_no_accuracy"}
        for key, c in cells.items():
            assert c["ci_low"] <= c["estimate"] <= c["ci_high"], (system, key)
    md = (out / "report.md").read_text()
    for part in ("## Differences against c-fine-tuned",
                 f"## Preference accuracy against shortcut rules ({len(heldout)} held-out pairs)",
                 "## Yes/no answers (4 questions: 2 expect yes, 2 expect no)",
                 "The set is balanced, so no constant answer can exceed 0.5.",
                 "## Yes/no answers per question (c-fine-tuned vs sft+dpo)",
                 "BERTScore: all-minilm-l6-v2, layer 3, not rescaled with a baseline",
                 "## Oracle RAG: the grounding passage in the prompt (3 of 4 questions)",
                 "| sft+dpo + oracle RAG | "):
        assert part in md, part
    # Oracle RAG: the three grounded questions, answered by every RAG system with the chunk
    # that holds their quote, beside the retrieved rows on the same three questions.
    assert report["generation"]["settings"]["bertscore"]["layer"] == 3
    oracle = report["oracle_rag"]
    assert (oracle["questions"], oracle["total"], oracle["without_chunk"]) == (3, 4, 1)
    assert set(oracle["rows"]) == set(report["models"])
    for row in oracle["rows"].values():
        assert set(row["oracle"]) == set(row["retrieved"]) == {
            "bleu", "rougeL", "bertscore_f1", "answer_nll"}
        assert all(c["n"] == 3 for c in row["oracle"].values())
    assert all(len(a) == 3 for a in oracle["answers"].values())
    ret = report["retrieval"]
    assert (ret["records"], ret["total"], ret["chunking"]) == (3, 4, "same")
    assert 0 <= ret["hit_rate"] <= 1


@pytest.mark.slow
def test_demo_recipe_on_smollm2_with_fewer_steps(tmp_path, smollm2_dir):
    """`make demo`'s recipe (configs/runs/value_alignment_demo.gin), shortened: the real
    SmolLM2 teacher writes yes/no records in one round over the document (its first chunks
    state too few rules to train on), only those train, and a few SFT steps already lower the
    held-out answer NLL of the real base model.

    It runs the real CLI in its own process on one CPU device, as `make demo` does: inside
    pytest's 8 fake devices every device would hold SmolLM2's weights and optimizer state
    (the run peaked at 23.6 GB and was killed).
    """
    out = tmp_path / "demo"
    params = ["cft_steps=2", "sft_steps=6", "dpo_steps=2", "num_samples=2",
              "max_new_tokens=12", "yes_no_max_new_tokens=6", "num_questions=8",
              "progress=False",
              "sdg_kwargs={'rounds': 1, 'chunk_tokens': 256, 'overlap': 0, "
              "'stages': ['yes_no'], 'concurrency': 64, "
              "'yes_no_config': @yes_no.YesNoConfig()}"]
    cmd = [sys.executable, "-m", "align_jax.cli", "run",
           "--gin_file=configs/runs/value_alignment_demo.gin", f"--output_dir={out}",
           *[f"--gin_param=value_alignment.value_alignment.{s}" for s in params]]
    # ALIGN_JAX_CACHE (set by smollm2_dir) is kept: the named model resolves to its copy.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), ALIGN_JAX_COMPILATION_CACHE="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"base", "c-fine-tuned", "sft", "sft+dpo"}
    summary = json.loads((out / "sdg" / "summary.json").read_text())
    assert summary["num_chunks"] == 17 and report["sdg"]["kinds"] == summary["kinds"]
    assert summary["teacher_calls"] > 0
    assert summary["parse_failures"] <= 0.05 * summary["teacher_calls"]
    # Only SDG records train, each from a chunk of the document; SDG balanced the answers.
    train = [json.loads(x) for x in open(out / "data" / "sft_train.jsonl")]
    assert train and all(r.get("chunk_id") and r.get("rule") for r in train)
    answers = [json.loads(x)["answer"] for split in ("train", "validation", "test")
               for x in open(out / "sdg" / "sft" / f"{split}.jsonl")]
    assert answers.count("yes") == answers.count("no") > 0
    base, sft = (report["models"][m]["answer_nll"]["nll_per_token"] for m in ("base", "sft"))
    assert sft < base
    md = (out / "report.md").read_text()
    assert "| question | reference (document) | base | SFT+DPO |" in md
    assert "SDG over 17 chunk(s)" in md and "## Training data" in md
    assert "## Yes/no answers (71 questions: 35 expect yes, 36 expect no)" in md
    for name in ("report.png", "dpo/hf/model.safetensors", "dpo/hf/tokenizer.json"):
        assert (out / name).exists(), name


def test_unknown_rag_system_is_refused_before_anything_runs(tmp_path):
    from align_jax.methods.value_alignment import value_alignment
    with pytest.raises(ValueError, match=r"rag_systems: \['base'\] are not among the models"):
        value_alignment(output_dir=str(tmp_path / "run"), document="examples/values_document.md",
                        rag_systems=["base", "sft+dpo"])  # from scratch: there is no base
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_completed_run_refuses_another_heldout_split(tmp_path, monkeypatch, capsys):
    """Rerun with another heldout_fraction, the held-out set would hold records that SFT and
    DPO trained on: refused in one line, and what the run wrote is left as it was."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    cheap = ["cft_steps=2", "sft_steps=2", "dpo_steps=2", "num_samples=1", "max_new_tokens=2",
             "progress=False", "bertscore_model=None", "teacher_forced=False",
             "oracle_rag=False", "retrieval='bm25'", "num_questions=1", "yes_no_test=None",
             "rag_systems=()"]

    def run(*extra):
        gin.clear_config()
        try:
            return cli.main(["run", "--gin_file=configs/runs/value_alignment_tiny.gin",
                             f"--output_dir={out}"] +
                            [f"--gin_param=value_alignment.value_alignment.{s}"
                             for s in cheap + list(extra)])
        finally:
            gin.clear_config()
    assert run() == 0
    written = {p: p.read_bytes() for p in (out / "data").iterdir()}
    report = (out / "report.json").read_bytes()
    capsys.readouterr()
    assert run("heldout_fraction=0.5") == 1
    err = capsys.readouterr().err.splitlines()[0]
    assert "value_alignment.heldout_fraction was 0.2 when sft/dpo trained, now 0.5" in err, err
    assert {p: p.read_bytes() for p in (out / "data").iterdir()} == written
    assert (out / "report.json").read_bytes() == report
    # Given the held-out file instead of a fraction: also a change of the split.
    sft_test = tmp_path / "sft_test.jsonl"
    sft_test.write_text("".join(json.dumps(r) + "\n" for r in SFT_TEST))
    assert run(f"sft_test='{sft_test}'") == 1
    assert "value_alignment.heldout_fraction was 0.2" in capsys.readouterr().err


def test_an_unreachable_judge_fails_the_recipe_before_any_training(tmp_path, monkeypatch,
                                                                   capsys):
    """The judge used to be asked first at evaluation, after every stage had trained."""
    import socket
    monkeypatch.chdir(ROOT)
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    gin.clear_config()
    try:
        code = cli.main(["run", "--gin_file=configs/runs/value_alignment_tiny.gin",
                         f"--output_dir={out}",
                         f"--gin_param=value_alignment.value_alignment.judge="
                         f"'openai:http://127.0.0.1:{port}/v1'"])
    finally:
        gin.clear_config()
    got = capsys.readouterr()
    err = got.err.splitlines()
    assert code == 1 and len(err) == 2, got.err
    assert err[0].startswith(f"align-jax run: JudgeError: judge openai:http://127.0.0.1:{port}"
                             f"/v1: the judge does not answer a one-request probe: "), err[0]
    assert "cannot connect" in err[0] and err[0].endswith("; nothing was trained"), err[0]
    assert not any((out / stage).exists() for stage in ("data", "cft", "sft", "dpo"))
