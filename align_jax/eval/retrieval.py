"""The RAG baseline: the one document chunk most similar to the question, put in the prompt.

Retrieval is TF-IDF cosine similarity over word unigrams and bigrams: no model, deterministic,
and strong enough for policy documents whose questions reuse the document's terms.
"""

import collections
import math
import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")


_STOP = frozenset(
    "a an and are as at be but by can do does for from has have how i if in into is it its "
    "me my no not of on or our should so that the their them then there these they this to "
    "us was we what when where which who will with would you your".split())


def _stem(word: str) -> str:
    # Plural and third-person "s" only: "gifts" and "gift" must meet; nothing fancier.
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _terms(text: str) -> list[str]:
    words = [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]
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

    def search(self, query: str, k: int = 1) -> list[tuple[int, float]]:
        """The k best (chunk index, cosine score), best first."""
        scores = self._matrix @ self._vector(collections.Counter(_terms(query)))
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in order]


def rag_prompt(question: str, context: str) -> str:
    """The prompt the RAG baseline sends: the retrieved passage, then the question."""
    return (f"Use the following passage from the document to answer.\n\n"
            f"Passage:\n{context}\n\nQuestion: {question}")


def with_retrieval(records: Sequence[dict], retriever: Retriever) -> list[dict]:
    """Copies of records whose `prompt` carries its best-matching chunk."""
    out = []
    for r in records:
        (i, _), = retriever.search(r["prompt"], k=1)
        out.append({**r, "prompt": rag_prompt(r["prompt"], retriever.chunks[i])})
    return out
