"""Evaluation never scores wrongly or silently: empty scores are n/a, a judge with no verdict
has no win rate, a failing judge is found before generating and its failure keeps the answers,
and every model is scored with its own tokenizer."""

import csv
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from align_jax.eval.report import evaluate_models
from align_jax.models.config import get_config
from align_jax.models.hf import save_hf
from align_jax.models.transformer import init_params
from align_jax.tokenizer_training import train_tokenizer
from tests.scripted_judge import serve

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUESTIONS = [{"prompt": "Can I accept a gift from a supplier?",
              "completion": "Only small tokens of thanks; never cash."},
             {"prompt": "Must I report a near miss?", "completion": "Yes, the same day."}]
PAIRS = [{"prompt": "Gift?", "chosen": "Refuse it.", "rejected": "Keep it."},
         {"prompt": "Who talks to the press?", "chosen": "The board chair.",
          "rejected": "Anyone who is asked."}]


def _model(path: pathlib.Path, *, vocab_size: int, seed: int, lines: list[str]) -> str:
    tok = train_tokenizer(lines, path, vocab_size=vocab_size)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=256,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_hf(cfg, init_params(cfg, jax.random.key(seed)), str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny random models with different tokenizers (trained with different vocabulary
    sizes on different text, so the same answer is different ids and a different count)."""
    base = tmp_path_factory.mktemp("models")
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines() if x]
    return {"small": _model(base / "small", vocab_size=300, seed=0, lines=lines),
            "large": _model(base / "large", vocab_size=520, seed=1,
                            lines=[x.lower() for x in lines[::-1]])}


def _tok(path):
    from align_jax.tokenizer import load_tokenizer
    return load_tokenizer(path)


def test_nothing_scored_is_na_never_minus_zero(models, tmp_path):
    """An answer NLL over no record (every reference answer too long for seq_len) is n/a in
    report.md and report.csv and nan in the report, not -0.000."""
    long = [{"prompt": "Tell me everything.", "completion": " ".join(["never cash"] * 60)}]
    report = evaluate_models(str(tmp_path), models={"small": models["small"]},
                             tokenizer=_tok(models["small"]), sft_test=long, pref_test=PAIRS,
                             seq_len=48, num_samples=1, max_new_tokens=2, bertscore_model=None)
    nll = report["models"]["small"]["answer_nll"]
    assert nll["examples"] == 0 and nll["skipped"] == 1 and math.isnan(nll["nll_per_token"])
    md = (tmp_path / "report.md").read_text()
    assert "-0.000" not in md and "| small | n/a | - |" in md
    with open(tmp_path / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["system"] == "small" and rows[0]["answer NLL"] == "n/a"
    assert float(rows[0]["preference accuracy"]) in (0.0, 0.5, 1.0)


def test_a_judge_with_no_verdict_gives_no_win_rate(models, tmp_path):
    """A judge that answers garbage to every pair: n/a with the parse-failure count, never
    0.50 [0.50, 0.50]."""
    with serve(lambda prompt: "I cannot decide between these. Maybe both?") as (seen, url):
        report = evaluate_models(str(tmp_path), models={"x": models["small"],
                                                        "y": models["small"]},
                                 tokenizer=_tok(models["small"]), sft_test=QUESTIONS,
                                 pref_test=[], seq_len=64, num_samples=1, max_new_tokens=2,
                                 bertscore_model=None, judge=f"openai:{url}",
                                 teacher_forced=False)
    wr = report["win_rates"]
    assert np.isnan(np.array(wr["win_rate"], float)[0, 1])
    assert wr["pairs"]["x vs y"]["parse_failures"] == 4 == wr["pairs"]["x vs y"]["n_judgements"]
    md = (tmp_path / "report.md").read_text()
    assert "0.50 [0.50, 0.50]" not in md and "0.50" not in md.split("## Pairwise")[1]
    assert "| x | - | n/a (4/4 unparsed) |" in md
    assert "the judge gave no usable verdict for 1 of 1 pair(s) of systems (x vs y)" in md
    assert "| x | n/a | n/a |" in md  # the mean over opponents
    json.loads((tmp_path / "report.md").read_text() and json.dumps(report, allow_nan=True))


def _jsonl(path: pathlib.Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_an_unreachable_judge_is_one_line_before_anything_is_generated(models, tmp_path,
                                                                        capsys):
    import socket

    import gin

    from align_jax import cli
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "eval"
    gin.clear_config()
    try:
        params = (f"models={{'x': '{models['small']}', 'y': '{models['small']}'}}",
                  f"sft_test='{_jsonl(tmp_path / 'q.jsonl', QUESTIONS)}'",
                  f"judge='openai:http://127.0.0.1:{port}/v1'", "max_new_tokens=2",
                  "seq_len=64", "bertscore_model=None")
        code = cli.main(["eval", f"--output_dir={out}",
                         *(f"--gin_param=entry.eval_main.{p}" for p in params)])
    finally:
        gin.clear_config()
    got = capsys.readouterr()
    err = got.err.splitlines()
    assert code == 1 and len(err) == 2, got.err
    assert err[0].startswith(f"align-jax eval: JudgeError: judge openai:http://127.0.0.1:{port}"
                             f"/v1: the judge does not answer a one-request probe: openai "
                             f"teacher http://127.0.0.1:{port}/v1: ")
    assert "cannot connect" in err[0] and err[0].endswith("; nothing was generated")
    assert "generating" not in got.out and not (out / "answers.json").exists()


def test_a_judge_answering_500_is_found_by_one_request_before_generating(models, tmp_path,
                                                                         capsys):
    from align_jax.eval.judge import JudgeError
    from align_jax.sdg.backends import make_teacher
    with serve(lambda prompt: "[RESULT] A", fail_after=0) as (seen, url):
        with make_teacher(f"openai:{url}", max_retries=0) as judge:
            with pytest.raises(JudgeError, match=r"does not answer a one-request probe: .*HTTP "
                                                 r"500: .*internal server error; nothing was "
                                                 r"generated$"):
                evaluate_models(str(tmp_path), models={"x": models["small"],
                                                       "y": models["small"]},
                                tokenizer=_tok(models["small"]), sft_test=QUESTIONS,
                                pref_test=[], seq_len=64, max_new_tokens=2,
                                bertscore_model=None, judge=judge, teacher_forced=False)
        assert len(seen.seen) == 1  # the probe, and nothing after it
    assert "generating" not in capsys.readouterr().out
    assert not (tmp_path / "answers.json").exists()


def test_a_judge_failing_mid_run_keeps_the_answers(models, tmp_path):
    """The probe and two judgements answer, then HTTP 500: one line, answers.json kept."""
    from align_jax.eval.judge import JudgeError
    from align_jax.sdg.backends import make_teacher
    with serve(lambda prompt: "[RESULT] A", fail_after=3) as (seen, url):
        with make_teacher(f"openai:{url}", max_retries=0, concurrency=1) as judge:
            with pytest.raises(JudgeError) as e:
                evaluate_models(str(tmp_path), models={"x": models["small"],
                                                       "y": models["small"]},
                                tokenizer=_tok(models["small"]), sft_test=QUESTIONS,
                                pref_test=[], seq_len=64, max_new_tokens=2,
                                bertscore_model=None, judge=judge, teacher_forced=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("judge OpenAITeacher failed while judging: ")
    assert "HTTP 500" in msg and msg.endswith(f"the generated answers are kept in "
                                              f"{tmp_path / 'answers.json'}")
    kept = json.loads((tmp_path / "answers.json").read_text())
    assert kept["prompts"] == [q["prompt"] for q in QUESTIONS]
    assert kept["references"] == [q["completion"] for q in QUESTIONS]
    assert sorted(kept["answers"]) == ["x", "y"] and all(
        len(a) == 2 and all(isinstance(t, str) for t in a) for a in kept["answers"].values())
    assert not (tmp_path / "report.md").exists()


def test_each_model_is_scored_and_generates_with_its_own_tokenizer(models, tmp_path):
    """`align-jax eval` over two models with different tokenizers: each model's answer NLL,
    preference margins and answers equal a direct computation with that model and its own
    tokenizer (the tester's run scored SmolLM2 with the tiny model's tokenizer)."""
    from align_jax import sharding
    from align_jax.eval.answers import generate_answers
    from align_jax.eval.entry import eval_main
    from align_jax.eval.scoring import answer_nll, preference_accuracy
    from align_jax.models.hf import load_hf
    toks = {n: _tok(p) for n, p in models.items()}
    text = QUESTIONS[0]["completion"]
    assert toks["small"].encode(text) != toks["large"].encode(text)  # the test can fail
    out = tmp_path / "eval"
    assert eval_main(output_dir=str(out), models=models,
                     sft_test=_jsonl(tmp_path / "q.jsonl", QUESTIONS),
                     preference_test=_jsonl(tmp_path / "p.jsonl", PAIRS), seq_len=128,
                     max_new_tokens=3, num_samples=1, bertscore_model=None) == 0
    report = json.loads((out / "report.json").read_text())
    mesh = sharding.make_mesh(sharding.MeshSpec())
    for name, path in models.items():
        config, params = load_hf(path, mesh=mesh, rules="fsdp")
        row, tok = report["models"][name], toks[name]
        # The report's scores come from the generation's prefill, the direct ones from
        # whole-row forwards: float32 sums in another order (the tolerance of test_report).
        want = answer_nll(config, params, tok, QUESTIONS, seq_len=128)
        assert row["answer_nll"] == pytest.approx(want, rel=1e-5), name
        want = preference_accuracy(config, params, tok, PAIRS, seq_len=128)
        assert row["preference"] == pytest.approx(want, rel=1e-4, abs=1e-4), name
        answers = generate_answers(config, params, tok, {name: [q["prompt"] for q in QUESTIONS]},
                                   max_new_tokens=3, mesh=mesh, rules="fsdp")[name]
        assert report["answers"][name] == answers, name
    assert report["tokenizers"] == {n: toks[n].path for n in models}
    md = (out / "report.md").read_text()
    assert (f"Tokenizers: each model is scored and generates with its own (small: "
            f"{toks['small'].path}; large: {toks['large'].path}). 2 different tokenizers") in md


def test_score_sets_of_two_tokenizers_keep_the_records_both_fit(models):
    """A record one tokenizer fits in seq_len and the other does not is scored by neither
    (the per-record scores of all models stay paired); each set keeps its own token ids."""
    from align_jax.eval import report as report_lib
    from align_jax.eval.scoring import ScoreSet
    from tests.data.data_char_tokenizer import CharTokenizer
    small, chars = _tok(models["small"]), CharTokenizer()
    records = [{"prompt": "Gift?", "completion": "Refuse it."},
               {"prompt": "Gift?", "completion": "Refuse every gift of cash, always, politely, "
                                                 "and tell your manager the same day."}]
    def kept(tok, seq_len):
        return ScoreSet.make(records, kind="sft", tokenizer=tok, seq_len=seq_len).kept
    # A length the subword tokenizer fits the long answer in and the characters do not.
    seq_len = next(n for n in range(8, 200) if kept(small, n) == (0, 1) != kept(chars, n))
    assert kept(chars, seq_len) == (0,)
    got = report_lib._group_score_sets({"a": small, "b": chars, "c": small}, sft_test=records,
                                       pref_test=[], rag_test=None, oracle_test=[],
                                       seq_len=seq_len, teacher_forced=True)
    assert sorted(got) == sorted({id(small), id(chars)})  # one group per tokenizer object
    for tok in (small, chars):
        s = got[id(tok)]["answer_nll"]
        assert s.kept == (0,) and s.skipped == 1
        assert list(s.examples[0].completions[0][:3]) == tok.encode("Refuse it.")[:3]
