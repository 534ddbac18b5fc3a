"""The value-alignment report's newer parts, wired end to end on tiny models: win rates as
mean +- SD over opponents, oracle-RAG rows beside the retrieved ones, the BERTScore setting,
and verdicts read under the judge's constraint (or tolerantly from a server that refuses it)."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest
from scripted_judge import serve

from align_jax.eval import answers as answers_lib
from align_jax.eval import bertscore, bleu, rouge
from align_jax.eval.answers import ORACLE_SUFFIX, RAG_SUFFIX
from align_jax.eval.metrics import bleu_from_statistics, bleu_statistics
from align_jax.eval.report import evaluate_models
from align_jax.eval.retrieval import BM25Retriever, OracleRetriever, rag_prompt
from align_jax.eval.scoring import answer_nll
from align_jax.models.config import get_config
from align_jax.models.hf import load_hf, save_hf
from align_jax.models.transformer import init_params
from align_jax.tokenizer_training import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHUNKS = ["Gifts over thirty euros are refused.",
          "Only the board chair speaks to journalists.",
          "Report every near miss within the same working day."]
IDS = ["g", "j", "n"]
QUESTIONS = [
    # grounded by id; by an evidence quote; by the rule of a yes/no record; by an id of
    # another chunking (no oracle row); by nothing (no oracle row).
    {"prompt": "Can I accept a gift from a supplier?", "completion": "Not above thirty euros.",
     "chunk_id": "g"},
    # (its words are the near-miss chunk's: retrieval misses, the oracle does not)
    {"prompt": "Who speaks when a near miss is reported the same working day?",
     "completion": "The board chair.", "evidence": "the board chair speaks"},
    {"prompt": "Must I report a near miss?", "completion": "Yes, the same day.",
     "rule": "Report every near miss within the same working day."},
    {"prompt": "Can I use a cooperative van at the weekend?", "completion": "No.",
     "chunk_id": "from-another-chunking"},
    {"prompt": "Is a gift register kept?", "completion": "Yes, at the office."},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines() if x]
    out = {}
    for seed, name in enumerate(("sft", "dpo")):
        # Most of a 1,200-piece vocabulary is word pieces, and wide random weights pick
        # varied ones: the answers are words, so the metrics have something to score.
        tok = train_tokenizer(lines, base / name, vocab_size=1200)
        cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=512, init_std=0.3,
                         tie_embeddings=False, bos_token_id=tok.bos_id,
                         eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        save_hf(cfg, init_params(cfg, jax.random.key(seed)), str(base / name))
        out[name] = str(base / name)
    return out, tok


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT with a WordPiece vocabulary of the test's words."""
    import torch
    import transformers
    path = tmp_path_factory.mktemp("bert")
    text = " ".join(CHUNKS + [q["prompt"] + " " + q["completion"] for q in QUESTIONS])
    words = sorted({w.strip(".,?").lower() for w in text.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?"] + words
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)},
                                     model_max_length=64)
    tok.save_pretrained(str(path))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(str(path), safe_serialization=True)
    return str(path)


def test_oracle_rows_bertscore_setting_and_retrieval_agreement(checkpoints, tiny_bert, tmp_path,
                                                               monkeypatch):
    models, tok = checkpoints
    calls = []
    real = answers_lib.generate

    def recording(config, params, prompts, **kw):
        out = real(config, params, prompts, **kw)
        calls.append((len(prompts), out.texts))
        return out
    monkeypatch.setattr(answers_lib, "generate", recording)
    retriever = BM25Retriever(CHUNKS)
    oracle = OracleRetriever(CHUNKS, IDS)
    report = evaluate_models(str(tmp_path), models=models, tokenizer=tok, sft_test=QUESTIONS,
                             pref_test=[], retriever=retriever, rag_models=("sft", "dpo"),
                             seq_len=128, num_samples=1, max_new_tokens=6,
                             bertscore_model=tiny_bert, bertscore_layer=1, oracle=oracle)
    # One generation per model holds its plain, retrieved and oracle prompts: 5 + 5 + 3.
    assert [n for n, _ in calls] == [13, 13]
    section = report["oracle_rag"]
    assert (section["questions"], section["total"], section["without_chunk"]) == (3, 5, 2)
    assert section["unknown_chunk_ids"] == 1
    keep = [0, 1, 2]
    refs = [QUESTIONS[i]["completion"] for i in keep]
    # The oracle prompts carry each question's own chunk; the oracle answers are what the
    # model generated from them (the last three rows of its generation).
    for (_, texts), name in zip(calls, ("sft", "dpo")):
        got = section["answers"][name + ORACLE_SUFFIX]
        assert got == [t.strip() for t in texts[10:]]
        retrieved = [report["answers"][name + RAG_SUFFIX][i] for i in keep]
        row = section["rows"][name]
        # Both rows on the same three questions, against independent metric code.
        for cells, hyps in ((row["oracle"], got), (row["retrieved"], retrieved)):
            assert cells["bleu"]["estimate"] == pytest.approx(bleu(hyps, refs))
            assert cells["rougeL"]["estimate"] == pytest.approx(rouge(hyps, refs)["rougeL"])
            want = bertscore(hyps, refs, model=tiny_bert, layer=1)["f1"]
            assert cells["bertscore_f1"]["estimate"] == pytest.approx(want, abs=1e-6)
            assert all(c["n"] == 3 for c in cells.values())
        for k, d in row["difference"].items():
            assert d["estimate"] == pytest.approx(row["oracle"][k]["estimate"]
                                                  - row["retrieved"][k]["estimate"])
        # NLL with the oracle passage equals scoring those records anew.
        config, params = load_hf(models[name])
        oracle_recs = [{**QUESTIONS[i], "prompt": rag_prompt(QUESTIONS[i]["prompt"], CHUNKS[i])}
                       for i in keep]
        want = answer_nll(config, params, tok, oracle_recs, seq_len=128)["nll_per_token"]
        assert row["oracle"]["answer_nll"]["estimate"] == pytest.approx(want, rel=1e-5)
    # BLEU of a subset is recomputed from its sentences' statistics, not averaged.
    stats = bleu_statistics(section["answers"]["sft" + ORACLE_SUFFIX], refs)
    assert section["rows"]["sft"]["oracle"]["bleu"]["estimate"] == pytest.approx(
        bleu_from_statistics(stats.sum(0)))
    # The oracle rows stay out of the main table (whose items are all five questions).
    assert not any(ORACLE_SUFFIX in s for s in report["intervals"])
    top = [hits[0][0] for hits in retriever.search_many([q["prompt"] for q in QUESTIONS[:3]])]
    assert top[1] == 2  # the miss: so the retrieved and the oracle prompts differ
    for row in section["rows"].values():
        assert row["difference"]["answer_nll"]["estimate"] != 0
    assert report["retrieval"] == {"hit_rate": np.mean(np.array(top) == [0, 1, 2]),
                                   "records": 3, "total": 5, "without_chunk": 2,
                                   "chunking": "same"}
    # BERTScore at layer 1 of 2, named; a different layer gives other scores.
    setting = report["generation"]["settings"]["bertscore"]
    assert setting == {"model": tiny_bert, "layer": 1, "last_layer": False, "rescaled": False,
                       "baseline": None}
    answers = report["answers"]["sft"]
    assert all(answers) and all(section["answers"]["sft" + ORACLE_SUFFIX])
    plain_refs = [q["completion"] for q in QUESTIONS]
    at = {layer: bertscore(answers, plain_refs, model=tiny_bert, layer=layer)["f1"]
          for layer in (1, None)}
    assert report["generation"]["metrics"]["sft"]["bertscore_f1"] == pytest.approx(at[1],
                                                                                   abs=1e-6)
    # Float32 BERTScore reproduces itself to ~1e-7; the layers differ by far more.
    assert abs(at[1] - at[None]) > 1e-5
    md = (tmp_path / "report.md").read_text()
    for part in (f"BERTScore: {tiny_bert}, layer 1, not rescaled with a baseline",
                 "## Oracle RAG: the grounding passage in the prompt (3 of 5 questions)",
                 "| sft + oracle RAG | ", "| sft + RAG (these questions) | ",
                 "| oracle minus retrieved (dpo) | ", "1 question(s) name a `chunk_id`",
                 "2 of the 5 questions have no known chunk in the retriever's chunking"):
        assert part in md, part
    csv_text = (tmp_path / "report.csv").read_text()
    assert "sft + oracle RAG,oracle RAG," in csv_text
    json.dumps(report)
    # The last layer is named as such; a baseline rescales every score (s - b) / (1 - b).
    last = evaluate_models(str(tmp_path / "last"), models={"sft": models["sft"]}, tokenizer=tok,
                           sft_test=QUESTIONS[:2], pref_test=[], seq_len=64, num_samples=1,
                           max_new_tokens=3, bertscore_model=tiny_bert, teacher_forced=False,
                           bertscore_baseline=(0.2, 0.3, 0.4))
    assert last["generation"]["settings"]["bertscore"] == {
        "model": tiny_bert, "layer": 2, "last_layer": True, "rescaled": True,
        "baseline": [0.2, 0.3, 0.4]}
    raw = bertscore(last["answers"]["sft"], plain_refs[:2], model=tiny_bert)
    got = last["generation"]["metrics"]["sft"]
    for key, b in (("precision", 0.2), ("recall", 0.3), ("f1", 0.4)):
        assert got[f"bertscore_{key}"] == pytest.approx((raw[key] - b) / (1 - b), abs=1e-6)
    assert ("layer 2 (the last layer), rescaled with the baseline [0.2, 0.3, 0.4]"
            in (tmp_path / "last" / "report.md").read_text())
    with pytest.raises(ValueError, match="bertscore_layer 3 is out of range 0..2"):
        evaluate_models(str(tmp_path / "bad"), models={"sft": models["sft"]}, tokenizer=tok,
                        sft_test=QUESTIONS[:1], pref_test=[], bertscore_model=tiny_bert,
                        bertscore_layer=3)


def _longer(prompt: str) -> str:
    """A written verdict for the longer response (ties: slot B)."""
    a = prompt.split("###Response A:\n")[1].split("\n\n###Response B:")[0]
    b = prompt.split("###Response B:\n")[1].split("\n\n###Reference Answer:")[0]
    letter = "A" if len(a) > len(b) else "B"
    return f"Response {letter} says more. [RESULT] {letter}"


def test_opponent_column_through_an_endpoint_that_refuses_constraints(checkpoints, tmp_path):
    models, tok = checkpoints
    retriever = BM25Retriever(CHUNKS)
    with serve(_longer, strict=True) as (handler, url):
        report = evaluate_models(str(tmp_path), models=models, tokenizer=tok,
                                 sft_test=QUESTIONS[:3], pref_test=[], retriever=retriever,
                                 rag_models=("dpo",), seq_len=128, num_samples=1,
                                 max_new_tokens=8, bertscore_model=None,
                                 judge=f"openai:{url}", teacher_forced=False)
    wr = report["win_rates"]
    names = wr["names"]
    assert names == ["sft", "dpo", "dpo + RAG"]
    # One unconstrained probe before anything was generated; then the judge was asked under
    # the verdict's regex first; the server refused every form, so the rest went
    # unconstrained and every verdict was read by the tolerant parser.
    probe, first = handler.seen[0], handler.seen[1]
    assert not {"structured_outputs", "guided_regex"} & set(probe)
    assert first["structured_outputs"]["regex"] == wr["constraint"]["pattern"]
    assert re.fullmatch(wr["constraint"]["pattern"], "Fine. [RESULT] A")
    assert wr["constraint"]["applied"] is False
    plain = [b for b in handler.seen[1:]
             if not {"structured_outputs", "guided_regex"} & set(b)]
    assert len(plain) == 3 * 3 * 2  # every judgement (3 pairs, 3 questions, 2 orders) once
    assert all(p["parse_failures"] == 0 for p in wr["pairs"].values())
    # mean +- SD over opponents: the row of the matrix without its diagonal, numpy's mean
    # and population SD (ddof=0).
    for key, mean, sd in (("win_rate", "mean", "sd"), ("lc_win_rate", "lc_mean", "lc_sd")):
        m = np.array(wr[key])
        for i, name in enumerate(names):
            row = np.delete(m[i], i)
            assert wr["opponents"][name][mean] == pytest.approx(row.mean())
            assert wr["opponents"][name][sd] == pytest.approx(row.std(ddof=0))
    assert wr["opponents_sd_ddof"] == 0
    md = (tmp_path / "report.md").read_text()
    assert "Win rate = mean +- SD over opponents" in md and "population SD (ddof=0)" in md
    for name in names:
        o = wr["opponents"][name]
        assert (f"| {name} | {o['mean']:.3f} +- {o['sd']:.3f} | "
                f"{o['lc_mean']:.3f} +- {o['lc_sd']:.3f} |") in md


def test_eval_command_oracle_rag_switch(checkpoints, tmp_path, monkeypatch):
    """`align-jax eval` with documents: the oracle over the documents' chunks by default,
    and no oracle rows with oracle_rag=False."""
    import gin

    from align_jax import cli
    models, _ = checkpoints
    monkeypatch.chdir(ROOT)
    test = tmp_path / "sft_test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "May I go up on a roof by myself?", "completion": "No.",
         "evidence": "never work on a roof alone"},
        {"prompt": "What colour are the vans?", "completion": "The code does not say."}]))
    reports = {}
    for on in (True, False):
        gin.clear_config()
        out = tmp_path / f"eval-{on}"
        assert cli.main(["eval", f"--output_dir={out}",
                         f"--gin_param=entry.eval_main.models={{'sft': '{models['sft']}'}}",
                         f"--gin_param=entry.eval_main.sft_test='{test}'",
                         "--gin_param=entry.eval_main.documents=('examples/values_document.md',)",
                         "--gin_param=entry.eval_main.retrieval='bm25'",
                         "--gin_param=entry.eval_main.bertscore_model=None",
                         "--gin_param=entry.eval_main.teacher_forced=False",
                         "--gin_param=entry.eval_main.num_samples=1",
                         "--gin_param=entry.eval_main.max_new_tokens=2",
                         f"--gin_param=entry.eval_main.oracle_rag={on}"]) == 0
        reports[on] = json.loads((out / "report.json").read_text())
    gin.clear_config()
    on, off = reports[True], reports[False]
    assert on["oracle_rag"]["questions"] == 1 and on["retrieval"]["records"] == 1
    assert list(on["oracle_rag"]["answers"]) == ["sft + oracle RAG"]
    assert "oracle_rag" not in off and "retrieval" not in off
    assert on["answers"] == off["answers"]  # the other systems are unchanged
