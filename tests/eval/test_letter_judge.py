"""The letter judge: a local model's P("A") vs P("B"), and soft win rates from it."""

import pathlib

import jax
import numpy as np
import pytest

from align_jax.eval.judge import load_judge_template, win_rate_matrix
from align_jax.eval.letter_judge import LetterJudge
from align_jax.models.config import get_config
from align_jax.models.transformer import forward, init_params
from align_jax.tokenizer_training import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory):
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines() if x]
    tok = train_tokenizer(lines + ["A", "B", "Answer with a single letter, A or B."],
                          tmp_path_factory.mktemp("tok"), vocab_size=300)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=512,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return cfg, init_params(cfg, jax.random.key(3)), tok


def test_letter_probabilities_equal_a_direct_forward(judge_model):
    cfg, params, tok = judge_model
    judge = LetterJudge((cfg, params, tok), seq_len=40, batch_size=3)
    prompts = ["Is honesty required? Answer A or B.", "Gifts over thirty euros are refused.",
               "A",  # the shortest prompt, and one cut on the left (longer than seq_len)
               " ".join(["Report every near miss within the same working day."] * 6)]
    got = judge.letter_probabilities(prompts, use_chat=False)
    a, b = tok.encode("A")[0], tok.encode("B")[0]
    want = []
    for p in prompts:
        ids = tok.encode(p, add_bos=True)[-(40 - 1):]
        logits = np.asarray(forward(cfg, params, np.asarray([ids], np.int32)))[0, -1]
        la, lb = logits[a], logits[b]
        want.append(np.exp(la) / (np.exp(la) + np.exp(lb)))
    assert len(tok.encode(prompts[-1], add_bos=True)) > 40
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


class ScriptedLetterJudge:
    """P(slot A) = sigmoid(slot bias + quality(A) - quality(B)): a judge with a fixed
    preference for the first slot that still ranks the responses."""
    context_length = 10_000

    def __init__(self, bias):
        self.bias = bias

    def letter_probabilities(self, prompts, *, use_chat=True):
        out = []
        for text in prompts:
            a = text.split("Response A: ")[1].split("\n")[0]
            b = text.split("Response B: ")[1].split("\n")[0]
            out.append(1 / (1 + np.exp(-(self.bias + _quality(a) - _quality(b)))))
        return np.array(out)


def _quality(text):
    return 0.5 * text.count("honest")


def test_soft_win_rates_cancel_a_constant_slot_preference():
    prompts = [f"question {i}" for i in range(6)]
    good = ["be honest honest", "honest answer", "say it honest", "honest", "honest honest x",
            "tell them honest"]
    bad = ["keep quiet", "lie", "hide it", "say nothing", "fudge it", "skip"]
    template = load_judge_template("choice")
    unbiased = win_rate_matrix(prompts, {"good": good, "bad": bad},
                               judge=ScriptedLetterJudge(0.0), template=template)
    biased = win_rate_matrix(prompts, {"good": good, "bad": bad},
                             judge=ScriptedLetterJudge(3.0), template=template)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    d = np.array([_quality(g) - _quality(b) for g, b in zip(good, bad)])
    for bias, m in ((0.0, unbiased), (3.0, biased)):
        p_ab, p_ba = sig(bias + d), sig(bias - d)
        pair = (p_ab + (1 - p_ba)) / 2
        res = m["results"][("good", "bad")]
        assert res.win_rate == pytest.approx(pair.mean())
        assert res.parse_failures == 0 and res.n_judgements == 12
        assert m["win_rate"][1][0] == pytest.approx(1 - pair.mean())
        assert res.judgements[0]["raw"][0] == f"P(A)={p_ab[0]:.4f}"
    # The slot preference shows as position bias but leaves the ranking: the better system
    # wins either way (the bias shrinks the margin through the sigmoid, never flips it).
    assert unbiased["results"][("good", "bad")].position_bias == 0.0
    assert biased["results"][("good", "bad")].position_bias == 1.0
    assert unbiased["win_rate"][0][1] > biased["win_rate"][0][1] > 0.5


def test_a_letter_that_is_several_tokens_is_refused(judge_model):
    cfg, params, tok = judge_model

    class Split:
        pad_id = tok.pad_id

        def encode(self, text, add_bos=False):
            return [5, 6] if text == "B" else [7]
    with pytest.raises(ValueError, match="letter 'B' is 2 tokens"):
        LetterJudge((cfg, params, Split()))
