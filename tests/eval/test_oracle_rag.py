"""The oracle of the value-alignment recipe: SDG's own chunks, cut again, name every SDG
record's grounding passage by its chunk_id; a different chunking matches none and falls back
to the record's rule; retrieval agreement in the retriever's own chunking."""

import json
import pathlib
import sys

import pytest

from align_jax.data.documents import chunk_document, load_document
from align_jax.eval.oracle_rag import (
    grounding_oracle,
    retrieval_agreement,
    sdg_chunks,
    unknown_chunk_ids,
    with_grounding,
)
from align_jax.eval.retrieval import BM25Retriever
from align_jax.sdg import yes_no
from align_jax.sdg.pipeline import run_document_sdg

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "sdg"))
from scripted_teacher import ScriptedTeacher, WordTokenizer  # noqa: E402

DOC = str(ROOT / "examples" / "values_document.md")
SDG = {"chunk_tokens": 60, "overlap": 10}


def _flat(text: str) -> str:
    return " ".join(text.split())


TEXT = _flat(load_document(DOC).text)


def _verbatim(record) -> bool:
    return "rule" in record and _flat(record["rule"]).rstrip(".") in TEXT


@pytest.fixture(scope="module")
def sdg_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdg")
    run_document_sdg([DOC], out, teacher=ScriptedTeacher(garbage=False),
                     tokenizer=WordTokenizer(), stages=["instruct", "yes_no"], progress=False,
                     verbose=False, yes_no_config=yes_no.YesNoConfig(min_cosine=None), **SDG)
    rows = []
    for split in ("train", "validation", "test"):
        path = out / "sft" / f"{split}.jsonl"
        if path.exists():
            rows += [json.loads(x) for x in path.read_text().splitlines() if x]
    assert any("rule" in r for r in rows) and any("rule" not in r for r in rows)
    return rows


def test_sdg_chunks_name_every_records_passage(sdg_records):
    chunks = sdg_chunks([DOC], tokenizer=WordTokenizer(), sdg_kwargs=SDG)
    rag = chunk_document(load_document(DOC), WordTokenizer(), chunk_tokens=25, overlap=3)
    by_id = {c.id: c.text for c in chunks}
    oracle = grounding_oracle(rag, chunks)
    found = oracle.lookup(with_grounding(sdg_records))
    for r, i in zip(sdg_records, found):
        # By its id: exactly the passage SDG wrote the record from (ids hash the text).
        assert r["chunk_id"] in by_id and oracle.chunks[i] == by_id[r["chunk_id"]]
        if _verbatim(r):  # the clause, less the full stop sdg.rules ends it with
            assert _flat(r["rule"]).rstrip(".") in _flat(oracle.chunks[i])
    assert unknown_chunk_ids(sdg_records, oracle) == 0
    # Cut with other settings, most chunks differ and match nothing (never a wrong one: a
    # short paragraph is the same chunk either way, and its id still names its text); the
    # yes/no records fall back to the chunk holding their rule, the others get no oracle row.
    other = grounding_oracle(rag, sdg_chunks([DOC], tokenizer=WordTokenizer(),
                                             sdg_kwargs={"chunk_tokens": 45, "overlap": 10}))
    known = set(other.chunk_ids)
    lost = [r for r in sdg_records if r["chunk_id"] not in known]
    assert unknown_chunk_ids(sdg_records, other) == len(lost) > len(sdg_records) // 2
    found = other.lookup(with_grounding(sdg_records))
    for r, i in zip(sdg_records, found):
        if r["chunk_id"] in known:
            assert other.chunks[i] == by_id[r["chunk_id"]]
        else:
            # Found exactly when the rule is a verbatim part of the document (not one of the
            # clauses sdg.rules joins across a cut), and then in a chunk that holds it.
            assert (i is not None) == _verbatim(r), r
            if i is not None:
                assert _flat(r["rule"]).rstrip(".") in _flat(other.chunks[i])
    rules = [r for r in sdg_records if "rule" in r]
    assert sum(map(_verbatim, rules)) >= 0.5 * len(rules)


def test_retrieval_agreement_in_the_retrievers_chunking(sdg_records):
    chunks = sdg_chunks([DOC], tokenizer=WordTokenizer(), sdg_kwargs=SDG)
    rag = chunk_document(load_document(DOC), WordTokenizer(), chunk_tokens=25, overlap=3)
    retriever = BM25Retriever([c.text for c in rag])
    oracle = grounding_oracle(rag, chunks)
    records = with_grounding(sdg_records)
    got = retrieval_agreement(records, retriever, oracle)
    # By hand: the gold chunk is the retriever chunk with the record's chunk_id (a short
    # paragraph is one chunk in both chunkings), else the first one holding its rule, else
    # its whole SDG chunk (60 words never fit in a 25-word chunk: no gold, left out).
    gold = []
    for r in records:
        same = [k for k, c in enumerate(rag) if c.id == r["chunk_id"]]
        quote = _flat(r.get("evidence") or next(c.text for c in chunks if c.id == r["chunk_id"]))
        gold.append(same[0] if same else
                    next((k for k, c in enumerate(rag) if quote in _flat(c.text)), None))
    keep = [k for k, g in enumerate(gold) if g is not None]
    top = retriever.search_many([records[k]["prompt"] for k in keep])
    hits = [t[0][0] == gold[k] for k, t in zip(keep, top)]
    assert got == {"hit_rate": pytest.approx(sum(hits) / len(hits)), "records": len(keep),
                   "total": len(records), "without_chunk": len(records) - len(keep),
                   "chunking": "retriever"}
    assert 0 < len(keep) < len(records)
