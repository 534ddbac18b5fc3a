"""The RAG baseline: the one document chunk most similar to the question, put in the prompt.

Three retrievers with one interface (`chunks`, `search(query, k)`, `search_many(queries, k)`):
  SemanticRetriever  cosine similarity of sentence embeddings (all-MiniLM-L6-v2 by default,
                     through align_jax's own encoder), as the value-alignment paper retrieves;
  BM25Retriever      Okapi BM25 over stemmed words: the no-model fallback;
  Retriever          TF-IDF cosine over word unigrams and bigrams (the earlier baseline, kept
                     for comparison).
`make_retriever(chunks, kind="semantic")` builds one, falling back to BM25 (with a warning)
when the embedding model is not installed. `with_retrieval` puts the best chunk in prompts.

A fourth, `OracleRetriever` (kind "oracle"), does not search: it returns a record's own
grounding chunk (the chunk its `chunk_id` names: the passage SDG wrote the question from; for
a hand-written record without one, the first chunk that contains its `evidence`, a quote
from the document).
Answers with the oracle chunk measure how well a system reads a correct passage; beside the
semantic rows they tell a retrieval error from a reading error. `oracle_records` keeps the
records that have a known grounding chunk, and `retrieval_hits` is the share of them for which
a retriever's first chunk is the grounding one.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from align_jax.models.encoder import embed_sentences, load_encoder
from align_jax.models.named import resolve_model_path
from align_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
RETRIEVERS = ("semantic", "bm25", "tfidf", "oracle")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be but by can do does for from has have how i if in into is it its "
    "me my no not of on or our should so that the their them then there these they this to "
    "us was we what when where which who will with would you your".split())


def _stem(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def bm25_terms(text: str) -> list[str]:
    """Lowercased words without stop words, plural "s" stripped ("gifts" meets "gift")."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]


def _terms(text: str) -> list[str]:
    words = bm25_terms(text)
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class Retriever:
    """TF-IDF index over chunks of text."""

    def __init__(self, chunks: Sequence[str]):
        if not chunks:
            raise ValueError("Retriever: no chunks to index")
        self.chunks = list(chunks)
        counts = [collections.Counter(_terms(c)) for c in self.chunks]
        df = collections.Counter(t for c in counts for t in c)
        self._vocab = {t: i for i, t in enumerate(sorted(df))}
        n = len(self.chunks)
        self._idf = np.array([math.log((1 + n) / (1 + df[t])) + 1 for t in sorted(df)])
        self._matrix = np.stack([self._vector(c) for c in counts])

    def _vector(self, counts: collections.Counter) -> np.ndarray:
        v = np.zeros(len(self._vocab))
        for t, c in counts.items():
            if t in self._vocab:
                v[self._vocab[t]] = (1 + math.log(c)) * self._idf[self._vocab[t]]
        norm = np.linalg.norm(v)
        return v / norm if norm else v

    def search_many(self, queries: Sequence[str], k: int = 1) -> list[list[tuple[int, float]]]:
        """Per query, the k best (chunk index, cosine score), best first."""
        if not queries:
            return []
        return _top(np.stack([self._matrix @ self._vector(collections.Counter(_terms(q)))
                              for q in queries]), k)

    def search(self, query: str, k: int = 1) -> list[tuple[int, float]]:
        """The k best (chunk index, cosine score), best first."""
        return self.search_many([query], k)[0]


def rag_prompt(question: str, context: str) -> str:
    """The prompt the RAG baseline sends: the retrieved passage, then the question."""
    return (f"Use the following passage from the document to answer.\n\n"
            f"Passage:\n{context}\n\nQuestion: {question}")


def with_retrieval(records: Sequence[dict], retriever) -> list[dict]:
    """Copies of records whose `prompt` carries its best-matching chunk.

    `retriever`: any retriever of this module; all prompts are looked up in one batch. An
    `OracleRetriever` puts each record's own grounding chunk instead, and every record must
    have one (see `oracle_records` to keep those that do).
    """
    if isinstance(retriever, OracleRetriever):
        best = retriever.lookup(records)
        missing = [i for i, b in enumerate(best) if b is None]
        if missing:
            i = missing[0]
            raise ValueError(f"oracle retrieval: record {i} ({records[i].get('prompt', '')[:60]!r})"
                             f" has {'an unknown' if records[i].get('chunk_id') else 'no'} "
                             f"'chunk_id' and no 'evidence' found in a chunk ({len(missing)} of "
                             f"{len(records)} records lack a known chunk); keep the others "
                             f"with oracle_records()")
    else:
        best = [hits[0][0] for hits in retriever.search_many([r["prompt"] for r in records], k=1)]
    return [{**r, "prompt": rag_prompt(r["prompt"], retriever.chunks[i])}
            for r, i in zip(records, best)]


class OracleRetriever:
    """Each record's own grounding chunk, by its `chunk_id` (no search).

    Attributes:
      chunks: the passages; chunk_ids: their ids (`data.documents.Chunk.id`, the
        `chunk_id` SDG writes into its records).
    """

    def __init__(self, chunks: Sequence[str], chunk_ids: Sequence[str]):
        if not chunks:
            raise ValueError("OracleRetriever: no chunks")
        if len(chunk_ids) != len(chunks):
            raise ValueError(f"OracleRetriever: {len(chunk_ids)} chunk ids for {len(chunks)} "
                             f"chunks")
        self.chunks, self.chunk_ids = list(chunks), [str(c) for c in chunk_ids]
        self._index = {c: i for i, c in enumerate(self.chunk_ids)}
        self._flat = [" ".join(c.split()) for c in self.chunks]

    def lookup(self, records: Sequence[dict]) -> list[int | None]:
        """Per record, the index of the chunk its `chunk_id` names, else of the first chunk
        containing its `evidence` (whitespace-normalised); None when neither finds one (e.g.
        an id from another chunking)."""
        out = []
        for r in records:
            cid = r.get("chunk_id")
            found = self._index.get(str(cid)) if cid is not None else None
            quote = r.get("evidence")
            if found is None and isinstance(quote, str) and quote.strip():
                quote = " ".join(quote.split())
                found = next((i for i, c in enumerate(self._flat) if quote in c), None)
            out.append(found)
        return out

    def search_many(self, queries: Sequence[str], k: int = 1):
        raise TypeError("OracleRetriever looks records up by their chunk_id, not queries by "
                        "text: use with_retrieval(records, oracle) or oracle.lookup(records)")

    search = search_many


def oracle_records(records: Sequence[dict], oracle: OracleRetriever
                   ) -> tuple[list[dict], list[int]]:
    """The records that have a known grounding chunk, with that chunk in the prompt.

    Returns:
      (copies of those records with `rag_prompt(prompt, their chunk)`, their indices in
      `records`).
    """
    found = oracle.lookup(records)
    keep = [i for i, b in enumerate(found) if b is not None]
    return ([{**records[i], "prompt": rag_prompt(records[i]["prompt"], oracle.chunks[found[i]])}
             for i in keep], keep)


def retrieval_hits(records: Sequence[dict], retriever, oracle: OracleRetriever) -> dict:
    """How often `retriever`'s first chunk is the record's grounding chunk.

    Returns:
      {"hit_rate": share of the records with a known grounding chunk whose first retrieved
      chunk is it (nan when none has one), "records": how many have one, "total":
      len(records)}. The two retrievers must index the same chunks in the same order.
    """
    if list(retriever.chunks) != oracle.chunks:
        raise ValueError("retrieval_hits: the retriever and the oracle index different chunks")
    gold = oracle.lookup(records)
    keep = [i for i, g in enumerate(gold) if g is not None]
    if not keep:
        return {"hit_rate": float("nan"), "records": 0, "total": len(records)}
    top = retriever.search_many([records[i]["prompt"] for i in keep], k=1)
    hits = [hits[0][0] == gold[i] for i, hits in zip(keep, top)]
    return {"hit_rate": float(np.mean(hits)), "records": len(keep), "total": len(records)}


def _top(scores_NC: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    order = np.argsort(-scores_NC, axis=1, kind="stable")[:, :k]
    return [[(int(i), float(row[i])) for i in idx] for row, idx in zip(scores_NC, order)]


class BM25Retriever:
    """Okapi BM25 (Robertson-Sparck Jones idf with +1 so it stays positive).

    score(q, c) = sum over query terms t of idf(t) * tf(t, c) * (k1 + 1) /
                  (tf(t, c) + k1 * (1 - b + b * |c| / avgdl)),
    idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5)).
    """

    def __init__(self, chunks: Sequence[str], *, k1: float = 1.5, b: float = 0.75):
        if not chunks:
            raise ValueError("BM25Retriever: no chunks to index")
        self.chunks, self.k1, self.b = list(chunks), float(k1), float(b)
        self._tf = [collections.Counter(bm25_terms(c)) for c in self.chunks]
        self._len = np.array([sum(tf.values()) for tf in self._tf], float)
        self._avgdl = max(float(self._len.mean()), 1e-9)
        df = collections.Counter(t for tf in self._tf for t in tf)
        n = len(self.chunks)
        self.idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk for the query, [C]."""
        out = np.zeros(len(self.chunks))
        norm = self.k1 * (1 - self.b + self.b * self._len / self._avgdl)
        for t in bm25_terms(query):
            if t not in self.idf:
                continue
            tf = np.array([c.get(t, 0) for c in self._tf], float)
            out += self.idf[t] * tf * (self.k1 + 1) / (tf + norm)
        return out

    def search_many(self, queries: Sequence[str], k: int = 1) -> list[list[tuple[int, float]]]:
        """Per query, the k best (chunk index, score), best first."""
        if not queries:
            return []
        return _top(np.stack([self.scores(q) for q in queries]), k)

    def search(self, query: str, k: int = 1) -> list[tuple[int, float]]:
        """The k best (chunk index, score), best first."""
        return self.search_many([query], k)[0]


def resolve_embedder(model: str | os.PathLike = DEFAULT_EMBEDDER) -> str:
    """A sentence-embedding model name or dir as a local checkpoint dir.

    Raises:
      FileNotFoundError when the named model's package is not installed.
    """
    return resolve_model_path(os.fspath(model))


class SemanticRetriever:
    """Cosine similarity of L2-normalised mean-pooled sentence embeddings."""

    def __init__(self, chunks: Sequence[str], *, model=DEFAULT_EMBEDDER, batch_size: int = 64):
        """Args:
          chunks: the passages to retrieve from.
          model: an encoder checkpoint dir or named model, or (EncoderConfig, params, tokenizer).
          batch_size: sentences per encoder forward.
        """
        if not chunks:
            raise ValueError("SemanticRetriever: no chunks to index")
        if isinstance(model, tuple):
            self.config, self.params, self.tokenizer = model
            self.model_name = "<in-memory encoder>"
        else:
            path = resolve_embedder(model)
            self.config, self.params = load_encoder(path)
            self.tokenizer = load_tokenizer(path)
            self.model_name = os.fspath(model)
        self.chunks, self.batch_size = list(chunks), batch_size
        self._emb_CD = self.embed(self.chunks)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings [N, D] of the texts."""
        return embed_sentences(self.config, self.params, self.tokenizer, list(texts),
                               batch_size=self.batch_size)

    def search_many(self, queries: Sequence[str], k: int = 1) -> list[list[tuple[int, float]]]:
        """Per query, the k best (chunk index, cosine), best first; one batched encoding."""
        if not queries:
            return []
        return _top(self.embed(queries) @ self._emb_CD.T, k)

    def search(self, query: str, k: int = 1) -> list[tuple[int, float]]:
        """The k best (chunk index, cosine), best first."""
        return self.search_many([query], k)[0]


def make_retriever(chunks: Sequence[str], *, kind: str = "semantic", model=DEFAULT_EMBEDDER,
                   chunk_ids: Sequence[str] | None = None):
    """A retriever over the chunks.

    Args:
      chunks: the passages (the same chunks the SDG used).
      kind: "semantic" (sentence embeddings; BM25 when the model is missing), "bm25", "tfidf",
        or "oracle" (each record's own grounding chunk; needs `chunk_ids`).
      model: the sentence-embedding model for "semantic".
      chunk_ids: the chunks' ids, for "oracle".
    Returns:
      An object with `chunks`, `search(query, k)` and `search_many(queries, k)` (the oracle:
      `lookup(records)`).
    """
    if kind == "oracle":
        if chunk_ids is None:
            raise ValueError("retriever kind 'oracle' needs chunk_ids (the chunks' ids)")
        return OracleRetriever(chunks, chunk_ids)
    if kind == "semantic":
        try:
            return SemanticRetriever(chunks, model=model)
        except FileNotFoundError as e:
            log.warning("semantic retrieval unavailable (%s); falling back to BM25", e)
            return BM25Retriever(chunks)
    if kind == "bm25":
        return BM25Retriever(chunks)
    if kind == "tfidf":
        return Retriever(chunks)
    raise ValueError(f"retriever kind {kind!r}: choose one of {RETRIEVERS}")
