"""Oracle-RAG rows: each RAG model answers with the question's own grounding chunk.

The semantic "+ RAG" rows mix two errors: retrieving the wrong passage and reading the right
one badly. Here each RAG model also answers the held-out questions whose grounding chunk is
known (`retrieval.OracleRetriever`: the record's `chunk_id`, else the chunk that contains its
`evidence` quote or its `rule`, the clause a yes/no SDG record was written from) with that
chunk in the prompt, as "<name> + oracle RAG". The oracle row and the semantic row are
scored on exactly those questions, with the same bootstrap resamples, so "oracle minus
retrieved" is a paired difference: what retrieval errors cost. Beside them, how often the
retriever's first chunk is the grounding one (`retrieval_agreement`).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from align_jax.data.documents import Chunk, chunk_documents, chunk_id, load_documents
from align_jax.eval.answers import ORACLE_SUFFIX, RAG_SUFFIX
from align_jax.eval.bootstrap import Bootstrap, Replicates
from align_jax.eval.intervals import HEADLINE, nll_replicates, text_replicates
from align_jax.eval.retrieval import OracleRetriever, retrieval_hits
from align_jax.sdg.pipeline import run_document_sdg

log = logging.getLogger(__name__)

KEYS = ("bleu", "rougeL", "bertscore_f1", "answer_nll")


def sdg_chunks(documents: Sequence[str | os.PathLike], *, tokenizer,
               sdg_kwargs: Mapping | None = None) -> list[Chunk]:
    """The chunks `run_document_sdg(documents, tokenizer=tokenizer, **sdg_kwargs)` writes its
    records from, cut again with the same chunker, tokenizer, chunk_tokens and overlap.

    A chunk's id is the hash of its text, so a record's `chunk_id` found among these chunks
    names exactly the passage it was written from; a chunk that SDG cut differently (its
    teacher's context bounded the chunks more tightly) just has no match here, never a wrong
    one: its records then fall back to their `evidence` or `rule` text.
    """
    kw = dict(sdg_kwargs or {})
    defaults = inspect.signature(run_document_sdg).parameters
    size = int(kw.get("chunk_tokens", defaults["chunk_tokens"].default))
    overlap = int(kw.get("overlap", defaults["overlap"].default))
    return chunk_documents(load_documents(documents), tokenizer, chunk_tokens=size,
                           overlap=overlap)


def grounding_oracle(chunks: Sequence[Chunk], *more: Sequence[Chunk]) -> OracleRetriever:
    """An oracle over `chunks` (the RAG chunks, searched first for `evidence`/`rule` text, so
    a record without a chunk id gets a passage of the retriever's own size) and then the
    chunks of `more` (SDG's), each id once."""
    seen, texts, ids = set(), [], []
    for c in [*chunks, *(c for group in more for c in group)]:
        if c.id not in seen:
            seen.add(c.id)
            texts.append(c.text)
            ids.append(c.id)
    return OracleRetriever(texts, ids)


def with_grounding(records: Sequence[Mapping]) -> list[dict]:
    """Copies of records whose `evidence` is their `evidence`, else their `rule` (the clause
    a yes/no SDG record was written from) without the full stop `sdg.rules` ends it with
    (the clause may end at a comma of the document's sentence): what
    `OracleRetriever.lookup` matches when the record's `chunk_id` is not among the oracle's
    chunks. A rule that is not a verbatim part of the document (clauses joined across a
    semicolon) matches no chunk: no oracle row, never a wrong one."""
    out = []
    for r in records:
        r = dict(r)
        if not _text(r.get("evidence")) and _text(r.get("rule")):
            r["evidence"] = r["rule"].strip().rstrip(".").strip()
        out.append(r)
    return out


def unknown_chunk_ids(records: Sequence[Mapping], oracle: OracleRetriever) -> int:
    """How many records name a `chunk_id` the oracle does not hold (a chunking it was not
    given); they fall back to their `evidence` or `rule` text. Logged as a warning."""
    known = set(oracle.chunk_ids)
    n = sum(r.get("chunk_id") is not None and str(r["chunk_id"]) not in known for r in records)
    if n:
        log.warning("oracle RAG: %d of %d held-out records name a chunk_id none of the "
                    "oracle's chunks has (another chunking?); they fall back to their "
                    "evidence or rule text", n, len(records))
    return n


def _text(x) -> bool:
    return isinstance(x, str) and bool(x.strip())


def retrieval_agreement(records: Sequence[Mapping], retriever, oracle: OracleRetriever
                        ) -> dict:
    """How often the retriever's first chunk is the record's grounding chunk.

    When the oracle indexes the retriever's own chunks this is `retrieval_hits`. Otherwise
    (the oracle holds the chunks SDG wrote the records from, a different chunking) the gold
    chunk is the retriever's chunk that contains the record's narrowest grounding text (its
    `evidence` or `rule`, else its whole oracle chunk); a record none of whose chunks
    contains it has no known chunk in the retriever's chunking and is left out.

    Args:
      records: held-out records (after `with_grounding`).
      retriever: the RAG retriever (`chunks`, `search_many`).
      oracle: the oracle the oracle rows were answered with.
    Returns:
      {"hit_rate", "records": how many have a known chunk in the retriever's chunking,
      "total", "without_chunk": total - records, "chunking": "same" or "retriever"}.
    """
    if list(retriever.chunks) == list(oracle.chunks):
        hits = retrieval_hits(records, retriever, oracle)
        return {**hits, "without_chunk": hits["total"] - hits["records"], "chunking": "same"}
    found = oracle.lookup(records)
    narrow = []
    for r, i in zip(records, found):
        quote = r.get("evidence") if _text(r.get("evidence")) else (
            oracle.chunks[i] if i is not None else None)
        narrow.append({**r, "evidence": quote})
    mine = OracleRetriever(retriever.chunks, [chunk_id(c) for c in retriever.chunks])
    hits = retrieval_hits(narrow, retriever, mine)
    return {**hits, "without_chunk": hits["total"] - hits["records"], "chunking": "retriever"}


def _cells(reps: Mapping[str, Replicates]) -> dict[str, dict]:
    return {k: r.interval().as_dict() for k, r in reps.items()}


def oracle_section(gen: Mapping, *, index: Sequence[int], total: int,
                   scores: Mapping | None = None, rag_set=None, oracle_set=None,
                   model_sets: Mapping | None = None) -> dict:
    """The oracle rows beside the semantic RAG rows on the same questions.

    Args:
      gen: `evaluate_generation`'s result (with "oracle").
      index: the position among the answered questions of each oracle record.
      total: how many questions were answered.
      scores: model -> set name -> log-probs (`gen["scores"]`), for the NLL columns.
      rag_set, oracle_set: the ScoreSets of the semantic RAG records (indexed like the
        held-out records) and of the oracle records (indexed like `index`); None: no NLL.
    Returns:
      {"questions", "total", "without_chunk", "rows": model -> {"retrieved", "oracle",
      "difference"}: metric -> interval dict (`Interval.as_dict`; "n" its items),
      "answers": oracle system -> answers}. The NLL is over the questions both sets kept
      (a record too long for seq_len is skipped). `model_sets`: model -> its own
      {"answer_nll_rag", "answer_nll_oracle"} ScoreSets (its own tokenizer), in place of
      rag_set / oracle_set for that model.
    """
    index = [int(i) for i in index]
    rows = {}
    for system, items in gen.get("oracle", {}).get("items", {}).items():
        model = system[:-len(ORACLE_SUFFIX)]
        semantic = gen["items"].get(model + RAG_SUFFIX)
        if semantic is None:
            continue
        sub = {k: np.asarray(v)[index] for k, v in semantic.items()}
        boot = Bootstrap(len(index))
        retrieved, oracle = text_replicates(sub, boot), text_replicates(items, boot)
        got = (scores or {}).get(model, {})
        own = (model_sets or {}).get(model, {})
        rag, orc = own.get("answer_nll_rag", rag_set), own.get("answer_nll_oracle", oracle_set)
        if rag is not None and orc is not None and "answer_nll_oracle" in got:
            nll = _paired_nll(rag, got["answer_nll_rag"], orc, got["answer_nll_oracle"], index)
            if nll is not None:
                retrieved["answer_nll"], oracle["answer_nll"] = nll
        rows[model] = {"retrieved": _cells(retrieved), "oracle": _cells(oracle),
                       "difference": {k: (oracle[k] - retrieved[k]).interval().as_dict()
                                      for k in oracle if k in retrieved}}
    return {"questions": len(index), "total": int(total),
            "without_chunk": int(total) - len(index), "unknown_chunk_ids": 0, "rows": rows,
            "answers": dict(gen.get("oracle", {}).get("answers", {}))}


def _paired_nll(rag_set, rag_sums, oracle_set, oracle_sums, index):
    """(retrieved, oracle) NLL-per-token Replicates over the records both sets kept, in the
    same order, so that their difference is paired; None when no record is in both."""
    rag_nll, rag_tok = rag_set.per_example(rag_sums)
    orc_nll, orc_tok = oracle_set.per_example(oracle_sums)
    at_rag = {int(q): k for k, q in enumerate(rag_set.kept)}
    pairs = [(at_rag[index[j]], k) for k, j in enumerate(oracle_set.kept)
             if index[j] in at_rag]
    if not pairs:
        return None
    r, o = (np.array(x) for x in zip(*pairs))
    return (nll_replicates(rag_nll[r], rag_tok[r]), nll_replicates(orc_nll[o], orc_tok[o]))


def csv_rows(section: Mapping | None) -> list[dict]:
    """report.csv rows of the oracle section (kind "RAG on the oracle questions" and
    "oracle RAG"): the headline metrics under report.csv's column titles."""
    out = []
    for model, r in (section or {}).get("rows", {}).items():
        for system, kind, cells in ((model + RAG_SUFFIX, "RAG on the oracle questions",
                                     r["retrieved"]),
                                    (model + ORACLE_SUFFIX, "oracle RAG", r["oracle"])):
            out.append({"system": system, "kind": kind,
                        **{HEADLINE[k]: cells[k]["estimate"] for k in KEYS if k in cells}})
    return out


def _cell(c: Mapping | None, key: str, *, sign: bool = False) -> str:
    if not c or not np.isfinite(c.get("estimate", np.nan)):
        return "-"
    d = 2 if key == "bleu" else 3
    f = (lambda x: f"{x:+.{d}f}") if sign else (lambda x: f"{x:.{d}f}")
    text = f"{f(c['estimate'])} [{f(c['ci_low'])}, {f(c['ci_high'])}]"
    if sign and (c["ci_low"] > 0 or c["ci_high"] < 0):
        return f"**{text}**"
    return text


def oracle_lines(section: Mapping | None, retrieval: Mapping | None) -> list[str]:
    """report.md's oracle-RAG section: the paired table and the retrieval agreement."""
    lines = []
    if section is not None:
        n, total = section["questions"], section["total"]
        lines += ["", f"## Oracle RAG: the grounding passage in the prompt ({n} of {total} "
                      f"questions)", "",
                  f"Each RAG model also answers the {n} held-out questions whose grounding "
                  f"chunk is known, with that chunk in the prompt instead of the retrieved one "
                  f"(\"+ oracle RAG\"); {section['without_chunk']} of the {total} questions "
                  f"have no known chunk (no `chunk_id` among the chunks, no `evidence` or "
                  f"`rule` found in one) and no oracle row"
                  + (f" ({section['unknown_chunk_ids']} question(s) name a `chunk_id` none of "
                     f"the oracle's chunks has, and were matched by their `evidence` or `rule` "
                     f"where they have one)" if section.get("unknown_chunk_ids") else "")
                  + f". Both rows are scored on exactly "
                  f"these {n} questions with the same bootstrap resamples, so \"oracle minus "
                  f"retrieved\" is paired: what retrieval errors cost (**bold**: its 95% "
                  f"interval excludes 0). Answer NLL over the records both prompts fit."]
        keys = [k for k in KEYS if any(k in r["oracle"] for r in section["rows"].values())]
        if keys and section["rows"]:
            lines += ["", "| system | " + " | ".join(HEADLINE[k] for k in keys) + " |",
                      "|---" * (len(keys) + 1) + "|"]
            for model, r in section["rows"].items():
                lines += [f"| {model}{RAG_SUFFIX} (these questions) | "
                          + " | ".join(_cell(r["retrieved"].get(k), k) for k in keys) + " |",
                          f"| {model}{ORACLE_SUFFIX} | "
                          + " | ".join(_cell(r["oracle"].get(k), k) for k in keys) + " |",
                          f"| oracle minus retrieved ({model}) | "
                          + " | ".join(_cell(r["difference"].get(k), k, sign=True)
                                       for k in keys) + " |"]
    if retrieval is not None:
        rate = retrieval["hit_rate"]
        where = ("" if retrieval["chunking"] == "same" else
                 " (the gold chunk: the retriever's chunk that contains the record's evidence, "
                 "rule or whole grounding chunk)")
        lines += ["", f"Retrieval: the retriever's first chunk is the question's grounding "
                      f"chunk{where} for "
                      + (f"{rate:.3f} of {retrieval['records']} questions"
                         if retrieval["records"] else "no question")
                      + f"; {retrieval['without_chunk']} of the {retrieval['total']} questions "
                        f"have no known chunk in the retriever's chunking."]
    return lines


__all__ = ["csv_rows", "grounding_oracle", "oracle_lines", "oracle_section",
           "retrieval_agreement", "sdg_chunks", "unknown_chunk_ids", "with_grounding"]
