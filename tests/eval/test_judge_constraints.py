"""Judges write their verdicts under the template's regex when they apply constraints: a local
judge with random weights still gives a readable verdict every time; the letter judge reads
the same two logits a choice-constrained greedy answer would."""

import pathlib
import re

import jax
import numpy as np
import pytest
from scripted_judge import serve

from align_jax.eval.judge import (
    VERDICT_REGEX,
    pairwise_win_rate,
    parse_verdict,
    verdict_pattern,
    win_rate_matrix,
)
from align_jax.eval.letter_judge import LetterJudge
from align_jax.generate import constraints
from align_jax.methods.aligners_eval import judge_settings, markdown
from align_jax.methods.sami_eval import judged
from align_jax.models.config import get_config
from align_jax.models.transformer import init_params
from align_jax.sdg.backends import LocalTeacher, make_teacher
from align_jax.tokenizer_training import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = ["Can I accept a gift from a supplier?", "Who speaks to journalists?",
           "Must I report a near miss?"]
SYSTEMS = {"x": ["Only small tokens of thanks.", "The board chair.", "Yes, the same day."],
           "y": ["Keep it.", "Anyone.", "No."]}


@pytest.fixture(scope="module")
def local_judge(tmp_path_factory):
    """A random tiny model (wide weights over a word-piece vocabulary, so its free text is
    random words) behind the `local:` teacher, which enforces constraints on the device."""
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines() if x]
    lines += ["[RESULT] A", "[RESULT] B", "Comparison: fine.", "Final Response: A"]
    tok = train_tokenizer(lines, tmp_path_factory.mktemp("judge"), vocab_size=1200)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=1024, init_std=0.3,
                     tie_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    params = init_params(cfg, jax.random.key(5))
    return LocalTeacher((cfg, params, tok)), (cfg, params, tok)


def test_verdict_patterns_fit_the_budget():
    for name in VERDICT_REGEX:
        p = verdict_pattern(name, max_tokens=64)
        for letter in "AB":
            # The longest answer the pattern allows has at most 64 characters.
            longest = {"[AB]": letter}.get(p) or (
                "x" * int(re.search(r"\{0,(\d+)\}", p).group(1))
                + ("\nFinal Response: " if "Final" in p else "\n[RESULT] ") + letter)
            assert re.fullmatch(p, longest) and len(longest) <= 64, (name, p)
            assert parse_verdict(longest) == letter
    assert verdict_pattern("prometheus_relative", max_tokens=1024) == \
        r"[^\n]{0,1000}\n?\[RESULT\] [AB]"  # FEEDBACK_CAP
    assert verdict_pattern("relative", max_tokens=64, feedback_chars=5) == \
        r"[^\n]{0,5}\n?\[RESULT\] [AB]"
    assert verdict_pattern("my_template.txt", max_tokens=64) is None
    with pytest.raises(ValueError, match="leaves no room"):
        verdict_pattern("constitution", max_tokens=10)


@pytest.mark.parametrize("template", ["relative", "constitution", "choice"])
def test_a_random_local_judge_under_the_constraint_always_gives_a_verdict(local_judge,
                                                                         template):
    judge, _ = local_judge
    # At most 8 feedback characters: even 4 byte-tokens a character (and the 18 of
    # "\nFinal Response: B") fit 56 tokens, so every answer completes.
    budget = {"choice": 4}.get(template, 56)
    m = win_rate_matrix(PROMPTS, SYSTEMS, judge=judge, template=template, max_tokens=budget,
                        principles="1. Follow the code.", references=SYSTEMS["x"],
                        feedback_chars=8)
    res = m["results"][("x", "y")]
    assert m["constraint"] == {"pattern": verdict_pattern(template, max_tokens=budget,
                                                          feedback_chars=8),
                               "applied": True, "incomplete": 0}
    assert res.parse_failures == 0 and res.constraint == m["constraint"]["pattern"]
    for j in res.judgements:
        assert None not in j["verdicts"], j["raw"]
    if template != "choice":
        # Unconstrained, the same judge writes random words and no verdict.
        free = win_rate_matrix(PROMPTS, SYSTEMS, judge=judge, template=template,
                               max_tokens=budget, principles="1. Follow the code.",
                               references=SYSTEMS["x"], constrain=False)
        assert free["constraint"]["pattern"] is None
        assert free["results"][("x", "y")].parse_failures == 2 * len(PROMPTS)


def test_aligner_and_sami_win_rates_are_constrained_too(local_judge):
    judge, _ = local_judge
    aligned = judge_settings(PROMPTS, SYSTEMS["y"], {"squad": SYSTEMS["x"]}, judge=judge,
                             max_tokens=24)
    w = aligned["squad"]
    assert w["parse_failures"] == 0 and w["constraint"] == verdict_pattern("pairwise",
                                                                          max_tokens=24)
    md = "\n".join(markdown(criteria=["ethical"], squad_pass={"ethical": 1.0},
                            ablation_pass={}, win_rates=aligned, judge="local", template="p"))
    assert f"{w['parse_failures']}/{w['n_judgements']} (constrained)" in md
    sami = judged(PROMPTS, SYSTEMS["x"], SYSTEMS["y"], principles="1. Be brief.", judge=judge,
                  max_tokens=40)
    assert sami["parse_failures"] == 0
    assert sami["constraint"] == verdict_pattern("constitution", max_tokens=40)


def test_an_endpoint_that_refuses_constraints_is_read_tolerantly():
    def answer(prompt):
        first = prompt.split("Response A:")[1]
        return ("Comparison: the first names the board.\nFinal Response: A"
                if "board" in first.split("Response B:")[0] else
                "Comparison: the second does.\nFinal Response: B")
    with serve(answer, strict=True) as (handler, url):
        teacher = make_teacher(f"openai:{url}", context_length=8192, max_retries=0,
                               concurrency=1)
        res = pairwise_win_rate(PROMPTS[1:2], ["The board chair."], ["Anyone."],
                                judge=teacher, template="constitution", principles="1. p")
        teacher.close()
    assert res.parse_failures == 0 and res.win_rate == 1.0 and res.position_bias == 0.0
    assert res.constraint is None  # asked under the regex, refused, answered free
    assert handler.seen[0]["structured_outputs"] == {
        "regex": verdict_pattern("constitution", max_tokens=512)}
    assert not teacher.applies_constraints


def test_letter_judge_reads_what_a_choice_constrained_greedy_answer_picks(tmp_path):
    """A choice(["A", "B"]) greedy answer is the larger of the same two logits the letter
    judge turns into P(A) / (P(A) + P(B)), so it would add a decode step and lose the
    probability (the soft score that cancels a constant slot preference). Shown on a
    byte-level BPE vocabulary, as SmolLM2's, where "A" and "B" are one token each and no
    other token spells them (a sentencepiece vocabulary's byte pieces <0x41> also spell "A":
    a constrained answer may then pick one the letter judge does not read)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from align_jax.tokenizer import load_tokenizer
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines()
             if x]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False}))
    tok = load_tokenizer(tmp_path)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=256, init_std=0.3,
                     tie_embeddings=False, eos_token_id=tok.eos_id, pad_token_id=0)
    model = (cfg, init_params(cfg, jax.random.key(7)), tok)
    prompts = [f"Question: {q}\nResponse A: {a}\nResponse B: {b}\nAnswer A or B:"
               for q, a, b in zip(PROMPTS, SYSTEMS["x"], SYSTEMS["y"])] + \
              [f"Response A: {b}\nResponse B: {a}\nWhich is better, A or B?"
               for a, b in zip(SYSTEMS["x"], SYSTEMS["y"])]
    p = LetterJudge(model, seq_len=256).letter_probabilities(prompts, use_chat=False)
    greedy = LocalTeacher(model).complete(prompts, temperature=0.0, max_tokens=1,
                                          constraint=constraints.choice(["A", "B"]))
    assert greedy == ["A" if x > 0.5 else "B" for x in p]
    assert len(set(greedy)) == 2 and np.all((p > 0) & (p < 1))
