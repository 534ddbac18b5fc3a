"""bleu and rouge are thin wrappers: check what they decide against the packages directly."""

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from align_jax.eval import bleu, rouge

HYPS = ["The cat sat on the mat.", "Employees must report gifts over fifty dollars.",
        "I do not know."]
REFS = ["The cat is sitting on the mat.", "Staff report any gift worth more than $50.",
        "Refuse politely and report it."]


def test_bleu_is_corpus_sacrebleu_single_reference():
    want = sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert bleu(HYPS, REFS) == pytest.approx(want, abs=1e-9)
    # Corpus BLEU pools n-gram counts; it is not the mean of sentence BLEU.
    mean_sentence = np.mean([sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(HYPS, REFS)])
    assert abs(bleu(HYPS, REFS) - mean_sentence) > 0.1
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    assert bleu([], []) == 0.0


def test_bleu_multiple_and_ragged_references():
    refs2 = [[r, h] for h, r in zip(HYPS, REFS)]
    want = sacrebleu.corpus_bleu(HYPS, [REFS, HYPS]).score
    assert bleu(HYPS, refs2) == pytest.approx(want)
    # A ragged set: the missing second reference of row 1 is sacrebleu's None.
    ragged = [[REFS[0], "A cat sat on a mat."], [REFS[1]], [REFS[2], "No idea."]]
    want = sacrebleu.corpus_bleu(HYPS, [[r[0] for r in ragged],
                                        ["A cat sat on a mat.", None, "No idea."]]).score
    assert bleu(HYPS, ragged) == pytest.approx(want)
    # Mixed string and list per row is the same as single-element lists.
    assert bleu(HYPS, [REFS[0], [REFS[1]], REFS[2]]) == pytest.approx(bleu(HYPS, REFS))


def test_bleu_empty_hypothesis_and_errors():
    want = sacrebleu.corpus_bleu(["", HYPS[1]], [[REFS[0], REFS[1]]]).score
    assert bleu(["", HYPS[1]], REFS[:2]) == pytest.approx(want)
    with pytest.raises(ValueError, match="2 hypotheses but 3"):
        bleu(HYPS[:2], REFS)
    with pytest.raises(ValueError, match=r"references\[1\]"):
        bleu(HYPS, [REFS[0], [], REFS[2]])
    with pytest.raises(TypeError):
        bleu("a b", "a b")


def test_rouge_mean_fmeasure_with_stemmer():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                      use_stemmer=True)
    got = rouge(HYPS, REFS)
    for k in ("rouge1", "rouge2", "rougeL"):
        want = np.mean([scorer.score(r, h)[k].fmeasure for h, r in zip(HYPS, REFS)])
        assert got[k] == pytest.approx(want)
    assert rouge(REFS, REFS) == pytest.approx(dict.fromkeys(got, 1.0))
    # Stemming matters: "sitting"/"sat" no, but "gifts"/"gift" yes.
    assert rouge(["gifts"], ["gift"])["rouge1"] == 1.0
    assert rouge(["gifts"], ["gift"], use_stemmer=False)["rouge1"] == 0.0


def test_rouge_lsum_splits_sentences():
    hyp = "Report the gift. Then refuse it politely."
    ref = "Refuse it politely. Report the gift."
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    split = scorer.score("Refuse it politely.\nReport the gift.",
                         "Report the gift.\nThen refuse it politely.")
    got = rouge([hyp], [ref])
    assert got["rougeLsum"] == pytest.approx(split["rougeLsum"].fmeasure)
    # Sentence-level LCS recovers both sentences; plain LCS over the whole text cannot.
    assert got["rougeLsum"] > got["rougeL"]
    unsplit = rouge([hyp], [ref], split_sentences=False)
    assert unsplit["rougeLsum"] == pytest.approx(scorer.score(ref, hyp)["rougeLsum"].fmeasure)
    assert unsplit["rougeLsum"] == pytest.approx(got["rougeL"])
    # Text that already has newlines is kept as the caller split it.
    assert rouge(["a b.\nc d."], ["c d.\na b."])["rougeLsum"] == 1.0


def test_rouge_multiple_references_take_best_and_empty_scores_zero():
    got = rouge([HYPS[0]], [["completely unrelated words", REFS[0]]])
    assert got == pytest.approx(rouge([HYPS[0]], [REFS[0]]))
    got = rouge(["", HYPS[0]], [REFS[1], REFS[0]])
    assert got["rouge1"] == pytest.approx(rouge([HYPS[0]], [REFS[0]])["rouge1"] / 2)
    assert rouge([], []) == dict.fromkeys(["rouge1", "rouge2", "rougeL", "rougeLsum"], 0.0)


def test_rouge_memoised_tokenizer_equals_the_package():
    """rouge() tokenizes through a memoised copy of rouge-score's tokenizer: same tokens,
    same scores as the package's own default tokenizer, references repeated or not."""
    from rouge_score import tokenizers

    from align_jax.eval.metrics import _Tokenizer
    rng = np.random.default_rng(0)
    words = ("Running runs ran the THE gifts gift's Policies policy, reporting REPORTED 50 "
             "$50 dollars! cats' caresses generously-given e-mail naïve 3.14 relational "
             "conditional hopefulness. Why? yes").split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(0, 30)))) for _ in range(40)]
    hyps, refs = texts[:20], texts[20:]
    for stem in (True, False):
        ours, theirs = _Tokenizer(stem), tokenizers.DefaultTokenizer(stem)
        assert all(ours.tokenize(t) == theirs.tokenize(t) for t in texts + texts)
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                          use_stemmer=stem)
        got = rouge(hyps, refs, use_stemmer=stem, split_sentences=False)
        for k in got:
            want = np.mean([scorer.score(r, h)[k].fmeasure for h, r in zip(hyps, refs)])
            assert got[k] == pytest.approx(want, abs=1e-12), (stem, k)
