"""Reference metrics on generated answers: corpus SacreBLEU and ROUGE F-measures.

Thin wrappers over the `sacrebleu` and `rouge-score` packages, so the numbers are the ones
the papers quote. What the wrappers decide, and the tests pin down:

- references: one string per hypothesis, or a list of strings per hypothesis (any number,
  at least one); BLEU pools n-gram matches over all of a hypothesis's references, ROUGE takes
  the best-scoring reference per hypothesis (rouge-score's `score_multi`).
- BLEU is corpus-level (not a mean of sentence scores), sacrebleu's default 13a tokenization,
  on the 0-100 scale sacrebleu prints.
- ROUGE is the mean over hypotheses of each pair's F-measure, on a 0-1 scale, with the Porter
  stemmer on. ROUGE-Lsum is computed over sentences separated by newlines: answers without
  newlines are first split into sentences at ". ", "! ", "? " (as the summarization
  literature does before rougeLsum) unless `split_sentences=False`.
- An empty hypothesis scores 0 (it is kept in the mean, never dropped).
- For bootstrap intervals over questions: `bleu_statistics` gives each sentence's sufficient
  statistics (hypothesis and closest-reference lengths, matched and total n-grams of each
  order, sacrebleu's own counts) and `bleu_from_statistics` the corpus BLEU of any sum of
  them; `rouge_scores` gives each pair's F-measures. The corpus values equal `bleu` / `rouge`.

Speed (evaluation scores thousands of answers per system, on the host): ROUGE tokenizes with
rouge-score's own `tokenize` and Porter stemmer, memoised per word and per text, so the
tokens are the package's, a reference shared by every system is tokenized once, and the
stemmer (two thirds of rouge-score's time) runs once per distinct word.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _references(hyps: Sequence[str], refs: Sequence) -> list[list[str]]:
    """Per hypothesis, its list of reference strings."""
    if isinstance(hyps, str) or isinstance(refs, str):
        raise TypeError("hyps and refs must be sequences of strings, not a single string")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    out = []
    for i, r in enumerate(refs):
        group = [r] if isinstance(r, str) else list(r)
        if not group or not all(isinstance(x, str) for x in group):
            raise ValueError(f"references[{i}]: expected a string or a non-empty list of "
                             f"strings, got {r!r}")
        out.append(group)
    for i, h in enumerate(hyps):
        if not isinstance(h, str):
            raise TypeError(f"hyps[{i}]: expected a string, got {type(h).__name__}")
    return out


def bleu(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], *,
         tokenize: str = "13a", lowercase: bool = False) -> float:
    """Corpus SacreBLEU of the hypotheses against their references.

    Args:
      hyps: one generated answer per example.
      refs: per example, a reference string or a list of reference strings.
      tokenize, lowercase: sacrebleu's options (defaults are sacrebleu's).
    Returns:
      BLEU on sacrebleu's 0-100 scale; 0.0 for no examples.
    """
    from sacrebleu.metrics import BLEU  # optional metric: loads only when BLEU is asked for
    groups = _references(hyps, refs)
    if not groups:
        return 0.0
    # sacrebleu wants reference *streams*; None marks a missing reference of a shorter group.
    return float(BLEU(tokenize=tokenize, lowercase=lowercase).corpus_score(
        list(hyps), _streams(groups)).score)


def _streams(groups: list[list[str]]) -> list[list[str | None]]:
    width = max(len(g) for g in groups)
    return [[g[k] if k < len(g) else None for g in groups] for k in range(width)]


def bleu_statistics(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], *,
                    tokenize: str = "13a", lowercase: bool = False) -> np.ndarray:
    """Per sentence, sacrebleu's sufficient statistics of corpus BLEU.

    Args:
      hyps, refs, tokenize, lowercase: as in `bleu`.
    Returns:
      int64 [N, 10]: hypothesis length, closest reference length, then matched 1..4-grams,
      then total 1..4-grams. Their column sums give `bleu` through `bleu_from_statistics`.
    """
    from sacrebleu.metrics import BLEU
    groups = _references(hyps, refs)
    if not groups:
        return np.zeros((0, 10), np.int64)
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    # sacrebleu's per-segment statistics (the counts corpus_score sums; its documented use
    # is re-computation in statistical tests), read in one pass over the corpus.
    stats = metric._extract_corpus_statistics(list(hyps), _streams(groups))
    return np.asarray(stats, np.int64).reshape(len(groups), 10)


def bleu_from_statistics(stats) -> float:
    """Corpus BLEU (0-100, sacrebleu's default exponential smoothing) from summed statistics.

    Args:
      stats: [10] column sums of `bleu_statistics` rows (any multiset of sentences).
    """
    from sacrebleu.metrics import BLEU
    s = [int(round(float(x))) for x in np.asarray(stats).reshape(10)]
    return float(BLEU.compute_bleu(correct=s[2:6], total=s[6:10], sys_len=s[0],
                                   ref_len=s[1], smooth_method="exp").score)


def _sentences(text: str) -> str:
    if "\n" in text.strip():
        return text
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


@functools.lru_cache(maxsize=1)
def _porter():
    from nltk.stem import porter  # rouge-score's stemmer (nltk is its dependency)
    stemmer = porter.PorterStemmer()

    class Stemmer:  # the package's stemmer, memoised (a pure function of the word)
        stem = staticmethod(functools.lru_cache(maxsize=1 << 18)(stemmer.stem))
    return Stemmer()


@functools.lru_cache(maxsize=1 << 16)
def _rouge_tokens(text: str, use_stemmer: bool) -> tuple[str, ...]:
    from rouge_score import tokenize
    return tuple(tokenize.tokenize(text, _porter() if use_stemmer else None))


class _Tokenizer:
    """rouge-score's DefaultTokenizer, memoised (same tokens; see the module docstring)."""

    def __init__(self, use_stemmer: bool):
        self.use_stemmer = use_stemmer

    def tokenize(self, text: str) -> list[str]:
        return list(_rouge_tokens(text, self.use_stemmer))


def rouge_scores(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], *,
                 use_stemmer: bool = True, split_sentences: bool = True
                 ) -> dict[str, np.ndarray]:
    """ROUGE-1/2/L/Lsum F-measure of each hypothesis against its references.

    Args:
      hyps, refs, use_stemmer, split_sentences: as in `rouge`.
    Returns:
      {"rouge1", "rouge2", "rougeL", "rougeLsum"}: float64 [N] F-measures in [0, 1].
    """
    from rouge_score import rouge_scorer  # optional metric: loads only when ROUGE is asked for
    groups = _references(hyps, refs)
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=use_stemmer,
                                      tokenizer=_Tokenizer(use_stemmer))
    out = {k: np.zeros(len(groups), np.float64) for k in _ROUGE_TYPES}
    prep = _sentences if split_sentences else (lambda s: s)
    for i, (h, group) in enumerate(zip(hyps, groups)):
        scores = scorer.score_multi([prep(r) for r in group], prep(h))
        for k in _ROUGE_TYPES:
            out[k][i] = scores[k].fmeasure
    return out


def rouge(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], *,
          use_stemmer: bool = True, split_sentences: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures of the hypotheses against their references.

    Args:
      hyps: one generated answer per example.
      refs: per example, a reference string or a list of them (the best one counts).
      use_stemmer: Porter stemming in rouge-score's tokenizer.
      split_sentences: put one sentence per line before ROUGE-Lsum (see module docstring).
    Returns:
      {"rouge1", "rouge2", "rougeL", "rougeLsum"}: mean F-measures in [0, 1] (0.0 each for
      no examples).
    """
    per = rouge_scores(hyps, refs, use_stemmer=use_stemmer, split_sentences=split_sentences)
    return {k: float(v.mean()) if len(v) else 0.0 for k, v in per.items()}
