"""The evaluation report: every system answers, is scored and judged; files for people."""

import csv
import json
import pathlib

import jax
import numpy as np
import pytest

from align_jax.eval import answers as answers_lib
from align_jax.eval import bleu, rouge
from align_jax.eval import report as report_lib
from align_jax.eval.judge import parse_verdict
from align_jax.eval.report import evaluate_models
from align_jax.eval.retrieval import BM25Retriever
from align_jax.eval.scoring import answer_nll, preference_accuracy
from align_jax.models.config import get_config
from align_jax.models.hf import load_hf, save_hf
from align_jax.models.transformer import init_params
from align_jax.tokenizer_training import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines() if x]
    out = {}
    for seed, name in enumerate(("sft", "dpo")):
        tok = train_tokenizer(lines, base / name, vocab_size=300)
        cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=512,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
        save_hf(cfg, init_params(cfg, jax.random.key(seed)), str(base / name))
        out[name] = str(base / name)
    return out, tok


class LongerJudge:
    """A judge that prefers the longer response, in-process (the HTTP path is in test_judge)."""
    context_length = 100_000

    def chat(self, conversations, *, temperature, top_p=1.0, max_tokens, seed=None):
        out = []
        for c in conversations:
            text = c[-1]["content"]
            a = text.split("###Response A:\n")[1].split("\n\n###Response B:")[0]
            b = text.split("###Response B:\n")[1].split("\n\n###Reference Answer:")[0]
            out.append("[RESULT] A" if len(a) > len(b) else "[RESULT] B")
        return out

    def count_tokens(self, text):
        return len(text.split())


def test_report_scores_every_system_and_writes_files(checkpoints, tmp_path, monkeypatch):
    models, tok = checkpoints
    calls = []
    real = answers_lib.generate

    def counting(config, params, prompts, **kw):
        calls.append(len(prompts))
        return real(config, params, prompts, **kw)
    monkeypatch.setattr(answers_lib, "generate", counting)
    scored_alone = []
    real_scoring = answers_lib.score_continuations

    def counting_scoring(config, params, prompts, continuations, **kw):
        scored_alone.append([len(c) for c in continuations])
        return real_scoring(config, params, prompts, continuations, **kw)
    monkeypatch.setattr(answers_lib, "score_continuations", counting_scoring)
    retrievals = []
    real_retrieval = report_lib.with_retrieval

    def counting_retrieval(records, retriever):
        retrievals.append(len(records))
        return real_retrieval(records, retriever)
    monkeypatch.setattr(report_lib, "with_retrieval", counting_retrieval)
    sft_test = [{"prompt": "Can I accept a gift from a supplier?",
                 "completion": "Only small tokens of thanks; never cash."},
                {"prompt": "Who speaks to journalists?",
                 "completion": "The board chair and the communications coordinator."},
                {"prompt": "Must I report a near miss?", "completion": "Yes, the same day."}]
    pref_test = [{"prompt": "Gift?", "chosen": "Refuse it.", "rejected": "Keep it."}]
    retriever = BM25Retriever(["Gifts over thirty euros are refused.",
                               "Only the board chair speaks to journalists.",
                               "Report every near miss within the same working day."])
    report = evaluate_models(str(tmp_path), models=models, tokenizer=tok, sft_test=sft_test,
                             pref_test=pref_test, retriever=retriever,
                             rag_models=("sft", "dpo"), seq_len=128, num_samples=2,
                             max_new_tokens=6, bertscore_model=None, judge=LongerJudge(),
                             reference=("dpo", "sft"))
    systems = ["sft", "sft + RAG", "dpo", "dpo + RAG"]
    # One batched generation per model, holding both of its systems' prompts; one retrieval
    # for every RAG model, its NLL and its answers.
    assert calls == [6, 6] and retrievals == [3]
    # The plain reference answers were scored from those generations' own prefills. Prompt
    # passes of their own: the preference prompt (not a question; one pass for its pair) and
    # the three RAG prompts, cut on the left to fit seq_len=128 with their answers (136-139
    # tokens), so not the prompts that were generated from.
    assert scored_alone == [[2, 1, 1, 1], [2, 1, 1, 1]]
    # Same numbers as the scorer's whole-row forward passes (an independent path).
    (c_dpo, p_dpo), (c_sft, p_sft) = (load_hf(models[n]) for n in ("dpo", "sft"))
    rag_test = report_lib.with_retrieval(sft_test, retriever)
    for name, (c, p) in (("sft", (c_sft, p_sft)), ("dpo", (c_dpo, p_dpo))):
        row = report["models"][name]
        for key, records in (("answer_nll", sft_test), ("answer_nll_rag", rag_test)):
            want = answer_nll(c, p, tok, records, seq_len=128)
            assert row[key] == pytest.approx(want, rel=1e-5), (name, key)
    # The implicit reward comes from the margins already scored; it equals scoring anew.
    want = preference_accuracy(c_dpo, p_dpo, tok, pref_test, seq_len=128,
                               reference=(c_sft, p_sft))
    assert report["implicit_reward"] == pytest.approx(want, abs=1e-4)
    assert report["models"]["dpo"]["preference"] == pytest.approx(
        preference_accuracy(c_dpo, p_dpo, tok, pref_test, seq_len=128), abs=1e-4)
    answers = report["answers"]
    assert list(answers) == systems and all(len(a) == 3 for a in answers.values())
    refs = [r["completion"] for r in sft_test]
    for s in systems:
        m = report["generation"]["metrics"][s]
        assert m["bleu"] == pytest.approx(bleu(answers[s], refs))
        assert m["rougeL"] == pytest.approx(rouge(answers[s], refs)["rougeL"])
    # The judge saw every pair of systems in both orders; its matrix is antisymmetric.
    wr = report["win_rates"]
    w = np.array(wr["win_rate"])
    assert wr["names"] == systems and np.allclose(w + w.T, 1.0)
    a, b = answers["sft"], answers["dpo"]
    want = np.mean([1.0 if len(x) > len(y) else 0.0 if len(y) > len(x) else 0.5
                    for x, y in zip(a, b)])
    assert w[0, 2] == pytest.approx(want)
    assert parse_verdict("[RESULT] A") == "A"
    with open(tmp_path / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["system"] for r in rows if r["kind"] == "system"] == systems
    # The shortcut rules follow the systems, as rows of their own (preference accuracy only).
    assert [r["kind"] for r in rows[len(systems):]] == ["shortcut"] * 4
    assert float(rows[1]["BLEU"]) == pytest.approx(report["generation"]["metrics"]["sft + RAG"]
                                                   ["bleu"])
    assert rows[0]["answer NLL"] and rows[0]["BERTScore F1"] == ""
    md = (tmp_path / "report.md").read_text()
    assert "| system | BLEU |" in md and "## Pairwise win rates" in md
    assert "| *reference* | Only small tokens of thanks; never cash. |" in md
    for name in ("metrics.png", "winrate.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    json.dumps(report)  # the whole report is JSON-serialisable
    assert report["generation"]["settings"] == {"decoding": "greedy", "max_new_tokens": 6,
                                                "questions": 3}


def test_only_process_zero_writes_the_report(checkpoints, tmp_path, monkeypatch):
    """In a multi-process run every process computes the report; only process 0 writes it."""
    import align_jax.distributed as distributed
    models, tok = checkpoints
    sft_test = [{"prompt": "Must I report a near miss?", "completion": "Yes, the same day."}]
    pref_test = [{"prompt": "Gift?", "chosen": "Refuse it.", "rejected": "Keep it."}]
    kw = dict(models={"sft": models["sft"]}, tokenizer=tok, sft_test=sft_test,
              pref_test=pref_test, retriever=None, rag_models=(), seq_len=64,
              num_samples=1, max_new_tokens=2, bertscore_model=None,
              stages={"sft": "sft"})
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    other = evaluate_models(str(tmp_path / "other"), **kw)
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    main = evaluate_models(str(tmp_path / "main"), **kw)
    assert other["answers"] == main["answers"]
    assert other["models"]["sft"]["answer_nll"] == main["models"]["sft"]["answer_nll"]
    written = sorted(p.name for p in (tmp_path / "main").iterdir())
    assert written == ["metrics.png", "report.csv", "report.md", "report.png"]
    # Written atomically: no temporary files are left beside them.
    assert not [p for p in (tmp_path / "main").iterdir() if p.name.startswith(".")]


def test_without_teacher_forced_scores(checkpoints, tmp_path, monkeypatch):
    """teacher_forced=False: the same answers and reference metrics, no scoring pass at all,
    and a report without the NLL and preference columns."""
    models, tok = checkpoints
    continuations, scored_alone = [], []
    real = answers_lib.generate

    def counting(config, params, prompts, **kw):
        continuations.append(kw.get("continuations"))
        return real(config, params, prompts, **kw)
    monkeypatch.setattr(answers_lib, "generate", counting)
    real_scoring = answers_lib.score_continuations

    def counting_scoring(*a, **kw):
        scored_alone.append(len(a[2]))
        return real_scoring(*a, **kw)
    monkeypatch.setattr(answers_lib, "score_continuations", counting_scoring)
    sft_test = [{"prompt": "Must I report a near miss?", "completion": "Yes, the same day."},
                {"prompt": "Gift?", "completion": "Refuse it."}]
    pref_test = [{"prompt": "Cash?", "chosen": "Refuse it.", "rejected": "Keep it."}]
    kw = dict(models=models, tokenizer=tok, sft_test=sft_test, pref_test=pref_test,
              retriever=None, rag_models=(), seq_len=64, num_samples=1, max_new_tokens=3,
              bertscore_model=None, reference=("dpo", "sft"), stages={"sft": "sft"})
    off = evaluate_models(str(tmp_path / "off"), **kw, teacher_forced=False)
    assert continuations == [None, None] and scored_alone == []
    assert off["models"] == {"sft": {}, "dpo": {}} and "implicit_reward" not in off
    on = evaluate_models(str(tmp_path / "on"), **kw)
    assert scored_alone == [1, 1]  # with them: the preference prompt, per model
    assert on["answers"] == off["answers"]
    assert on["generation"]["metrics"] == off["generation"]["metrics"]
    with open(tmp_path / "off" / "report.csv") as f:
        header = next(csv.reader(f))
    assert "BERTScore F1" in header and "answer NLL" not in header
    assert not [h for h in header if "nll" in h.lower() or "preference" in h]
    md = (tmp_path / "off" / "report.md").read_text()
    assert "not computed (teacher_forced=False)" in md and "Answer NLL" not in md
    assert "## Teacher-forced scores" in (tmp_path / "on" / "report.md").read_text()
    assert (tmp_path / "off" / "report.png").stat().st_size > 5_000
    # The yes/no section needs only generated answers: it works without the scoring passes.
    yn = evaluate_models(str(tmp_path / "yn"), **kw, teacher_forced=False,
                         yes_no_test=YES_NO_TEST, yes_no_max_new_tokens=2)
    assert "preference_evidence" not in yn and scored_alone == [1, 1]
    assert set(yn["intervals"]["dpo"]) == {"bleu", "rougeL", "yes_no_accuracy"}
    assert yn["yes_no"]["rows"]["always yes"]["accuracy"]["estimate"] == 0.5
    md = (tmp_path / "yn" / "report.md").read_text()
    assert "## Yes/no answers (4 questions" in md and "shortcut rules" not in md


YES_NO_TEST = [{"question": "Must I report a near miss?", "answer": "yes", "pair_id": "a"},
               {"question": "May I skip reporting a near miss?", "answer": "no", "pair_id": "a"},
               {"question": "Can I accept cash from a supplier?", "answer": "no"},
               {"question": "Can I refuse a gift?", "answer": "yes"}]


def test_report_with_yes_no_questions_shortcuts_and_intervals(checkpoints, tmp_path,
                                                              monkeypatch):
    """The evidence sections: every system answers the yes/no questions (RAG ones with the
    passage) at their own budget; intervals for every headline metric and every difference
    against the first model; shortcut and constant-answer rows in report.md and report.csv."""
    from align_jax.eval.bootstrap import Bootstrap
    from align_jax.eval.evidence import answer_polarity
    models, tok = checkpoints
    calls = []
    real = answers_lib.generate

    def recording(config, params, prompts, **kw):
        out = real(config, params, prompts, **kw)
        calls.append((prompts, kw, out.texts))
        return out
    monkeypatch.setattr(answers_lib, "generate", recording)
    sft_test = [{"prompt": "Must I report a near miss?", "completion": "Yes, the same day."},
                {"prompt": "Who speaks to journalists?", "completion": "The board chair."},
                {"prompt": "Gift?", "completion": "Refuse it."}]
    pref_test = [{"prompt": "Gift?", "chosen": "No. Refuse it.", "rejected": "Yes, keep it."},
                 {"prompt": "Roof?", "chosen": "Never alone.", "rejected": "Go, it is quick."},
                 {"prompt": "Stop?", "chosen": "Yes, always.", "rejected": "No, finish it."}]
    retriever = BM25Retriever(["Report every near miss within the same working day.",
                               "Gifts over thirty euros are refused."])
    report = evaluate_models(str(tmp_path), models=models, tokenizer=tok, sft_test=sft_test,
                             pref_test=pref_test, retriever=retriever, rag_models=("dpo",),
                             seq_len=128, num_samples=1, max_new_tokens=6,
                             bertscore_model=None, reference=("dpo", "sft"),
                             stages={"sft": "sft"}, yes_no_test=YES_NO_TEST,
                             yes_no_instruction="Answer yes or no.", yes_no_max_new_tokens=3)
    yn = report["yes_no"]
    systems = ["sft", "dpo", "dpo + RAG"]
    assert list(yn["rows"]) == ["always yes", "always no", *systems]
    # Per model: one generation of its questions, one of its yes/no prompts at budget 3,
    # compiled for the main budget of 6.
    assert [(len(p), kw["max_new_tokens"], kw.get("shape_budget")) for p, kw, _ in calls] == [
        (3, 6, None), (4, 3, 6), (6, 6, None), (8, 3, 6)]
    yes_no_prompts, kw, texts = calls[3]
    assert kw["tokenizer"] is tok
    # The plain prompts are the questions with the instruction after them; the RAG prompts
    # the same after the question's retrieved passage.
    from align_jax.eval.evidence import yes_no_prompt
    qs = [r["question"] for r in YES_NO_TEST]
    rag = report_lib.with_retrieval([{"prompt": q} for q in qs], retriever)
    want = [yes_no_prompt(q, "Answer yes or no.") for q in qs] + \
        [yes_no_prompt(r["prompt"], "Answer yes or no.") for r in rag]
    assert yes_no_prompts == [answers_lib.chat_prompt_ids(tok, p, max_prompt_tokens=506)
                              for p in want]
    assert all("Passage:" in p for p in want[4:])
    for q in yn["per_question"]:
        for s in systems:
            a = q["answers"][s]
            assert a["polarity"] == answer_polarity(a["text"])
            assert a["right"] == (a["polarity"] == q["expected"])
    assert [q["answers"]["dpo + RAG"]["text"] for q in yn["per_question"]] == [
        t.strip() for t in texts[4:]]
    # A balanced set: each constant answer scores exactly 0.5 and none can do better.
    assert yn["yes_share"] == 0.5 and yn["minimal_pairs"] == 1
    for c in ("always yes", "always no"):
        assert yn["rows"][c]["accuracy"]["estimate"] == 0.5
        assert yn["rows"][c]["pairs_both_right"]["estimate"] == 0.0
    # Intervals: every headline metric of every system contains its estimate; differences
    # against the first model (no model is named "base"), which has none of its own.
    assert report["base_system"] == "sft"
    table = report["intervals"]
    assert list(table) == systems
    for s, row in table.items():
        assert set(row) == {"bleu", "rougeL", "answer_nll", "preference_accuracy",
                            "yes_no_accuracy"}
        for key, cell in row.items():
            assert cell["ci_low"] <= cell["estimate"] <= cell["ci_high"], (s, key)
            assert ("diff" in cell) == (s != "sft"), (s, key)
    for s in systems:
        assert 0 <= table[s]["yes_no_accuracy"]["estimate"] <= 1
        assert table[s]["yes_no_accuracy"]["estimate"] == yn["rows"][s]["accuracy"]["estimate"]
    # The NLL interval is the bootstrap of summed NLL over summed tokens (plain records).
    dpo_nll = report["models"]["dpo"]["answer_nll"]["nll_per_token"]
    assert table["dpo"]["answer_nll"]["estimate"] == pytest.approx(dpo_nll, rel=1e-9)
    assert table["dpo"]["preference_accuracy"]["estimate"] == pytest.approx(
        report["models"]["dpo"]["preference"]["accuracy"])
    # Shortcuts on the three pairs by hand: starts with No 1/2 (pair 1: 1, pair 2: 1/2,
    # pair 3: 0), starts with Yes 1/2 (0, 1/2, 1), shorter 2/3 (14 vs 13 characters: 0,
    # 12 vs 16: 1, 12 vs 14: 1), longer 1/3.
    ev = report["preference_evidence"]
    assert {k: r["estimate"] for k, r in ev["rows"].items() if r["kind"] == "shortcut"} == \
        pytest.approx({'starts with "No"': 0.5, 'starts with "Yes"': 0.5,
                       "shorter answer": 2 / 3, "longer answer": 1 / 3})
    assert ev["best_shortcut"] == "shorter answer"
    assert set(ev["comparisons"]) == {"sft", "dpo", "implicit reward (dpo vs sft)"}
    assert "cannot be told apart on 3 pairs" in json.dumps(ev)  # 3 pairs resolve nothing
    md = (tmp_path / "report.md").read_text()
    for part in ("| system | BLEU | ROUGE-L | answer NLL | preference accuracy | "
                 "yes/no accuracy |", "## Differences against sft",
                 "## Preference accuracy against shortcut rules (3 held-out pairs)",
                 "Best shortcut: shorter answer", "## Yes/no answers (4 questions: 2 expect "
                 "yes, 2 expect no)", '"Answer yes or no."',
                 "The set is balanced, so no constant answer can exceed 0.5.",
                 "| always no | constant | 0.500 [", "## Yes/no answers per question (sft vs dpo)",
                 "| Must I report a near miss? | yes | **"):
        assert part in md, part
    with open(tmp_path / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["system"], r["kind"]) for r in rows] == [
        *((s, "system") for s in systems), *((k, "shortcut") for k in ev["rows"]
                                              if ev["rows"][k]["kind"] == "shortcut"),
        ("always yes", "constant answer"), ("always no", "constant answer")]
    by = {r["system"]: r for r in rows}
    dpo = table["dpo"]["bleu"]
    assert float(by["dpo"]["bleu_ci_low"]) == pytest.approx(dpo["ci_low"])
    assert float(by["dpo"]["bleu_diff_vs_base"]) == pytest.approx(dpo["diff"])
    assert by["sft"]["bleu_diff_vs_base"] == "" and by["dpo"]["base system"] == "sft"
    assert float(by["always no"]["yes/no accuracy"]) == 0.5
    assert float(by["always no"]["yes_no_accuracy_no"]) == 1.0
    assert float(by["shorter answer"]["preference accuracy"]) == pytest.approx(2 / 3)
    # The yes/no accuracy interval is the mean's bootstrap over the 4 questions.
    right = [q["answers"]["dpo"]["right"] for q in yn["per_question"]]
    want = Bootstrap(4).mean(np.array(right, float)).interval()
    assert float(by["dpo"]["yes_no_accuracy_ci_high"]) == pytest.approx(want.high)
    json.dumps(report)
    for name in ("metrics.png", "report.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
