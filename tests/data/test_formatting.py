"""Records -> tokens with the chat template, and the explicit truncation policies."""

import numpy as np
import pytest
from data_char_tokenizer import CharTokenizer, chars

from align_jax.data import formatting
from align_jax.data.formatting import Example, format_records, truncate
from align_jax.data.sources import DataError, Record

TOK = CharTokenizer()
USER, ASSISTANT, END, BOS, EOS = 3, 4, 6, 1, 2


def _fmt(records, kind, seq_len=64, **kw):
    recs = [Record(data=r, where=f"f.jsonl:{i + 1}") for i, r in enumerate(records)]
    return format_records(recs, kind=kind, tokenizer=TOK, seq_len=seq_len, **kw)


def test_sft_prompt_is_user_turn_plus_generation_prompt():
    (ex,), report, _ = _fmt([{"prompt": "hi", "completion": "yo"}], "sft")
    assert ex.prompt.tolist() == [BOS, USER, *chars("hi"), END, ASSISTANT]
    assert [c.tolist() for c in ex.completions] == [chars("yo") + [EOS]]
    assert ex.where == "f.jsonl:1" and report.num_examples == 1 and not report.cut


def test_sft_messages_score_every_assistant_turn():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    (ex,), _, _ = _fmt([{"messages": msgs}], "sft")
    expect = TOK.encode(TOK.apply_chat_template(msgs[:2], add_generation_prompt=True))
    assert ex.prompt.tolist() == expect
    assert ex.completions[0].tolist() == [*chars("b"), EOS, END, USER, *chars("c"), END,
                                          ASSISTANT, *chars("d"), EOS]
    assert ex.scored.tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 1]
    # One assistant turn: the prompt + completion tokens, all scored.
    (one,), _, _ = _fmt([{"messages": msgs[:3]}], "sft")
    assert one.completions[0].tolist() == chars("b") + [EOS] and one.scored is None
    with pytest.raises(DataError, match="f.jsonl:1: field 'messages' must end with an assistant"):
        _fmt([{"messages": msgs[:-1]}], "sft")
    examples, _, skipped = _fmt([{"messages": msgs[:-1]}], "sft", on_error="skip")
    assert examples == [] and skipped[0][0] == "f.jsonl:1"


def test_lm_preference_kto_sami():
    (lm,), _, _ = _fmt([{"text": "abc"}], "lm")
    assert lm.prompt.tolist() == [BOS] and lm.completions[0].tolist() == chars("abc") + [EOS]
    (pref,), _, _ = _fmt([{"prompt": "q", "chosen": "yes", "rejected": "no"}], "preference")
    assert [c.tolist() for c in pref.completions] == [chars("yes") + [EOS], chars("no") + [EOS]]
    conv = [{"role": "assistant", "content": "yes"}]
    (pref2,), _, _ = _fmt([{"prompt": [{"role": "user", "content": "q"}], "chosen": conv,
                            "rejected": "no"}], "preference")
    assert np.array_equal(pref2.prompt, pref.prompt)
    assert np.array_equal(pref2.completions[0], pref.completions[0])
    (kto,), _, _ = _fmt([{"prompt": "q", "completion": "a", "label": False}], "kto")
    assert kto.label == 0.0
    (sami,), _, _ = _fmt([{"prompt": "q", "constitutions": ["c1", "c2"],
                           "responses": ["r", [7, 8, 9]]}], "sami")
    assert sami.prompts[1].tolist() == [BOS, USER, *chars("c2\n\nq"), END, ASSISTANT]
    assert sami.responses[0].tolist() == chars("r") + [EOS]
    assert sami.responses[1].tolist() == [7, 8, 9]  # sampled ids are used as sampled


def test_constitution_text():
    text = formatting.constitution_text({"id": 1, "principles": ["be kind", "be brief"],
                                         "negated": [False, False]})
    assert text == "1. be kind\n2. be brief"


def test_plain_text_prompt_for_base_models():
    (ex,), _, _ = _fmt([{"prompt": "hi", "completion": "yo"}], "sft", chat_template=False)
    assert ex.prompt.tolist() == [BOS] + chars("hi")


def _ex(p, *cs, where="w"):
    return Example(prompt=np.arange(100, 100 + p, dtype=np.int32),
                   completions=tuple(np.arange(200, 200 + c, dtype=np.int32) for c in cs),
                   where=where)


def test_truncate_prompt_left_keeps_the_end_of_the_prompt():
    report = formatting.TruncationReport(policy="truncate_prompt_left", seq_len=10)
    out = truncate(_ex(8, 4), seq_len=10, policy="truncate_prompt_left", report=report)
    assert out.prompt.tolist() == list(range(102, 108)) and len(out.completions[0]) == 4
    # Preference: the longer completion sets how much prompt both share.
    out = truncate(_ex(8, 3, 5), seq_len=10, policy="truncate_prompt_left", report=report)
    assert len(out.prompt) == 5 and out.lengths() == (8, 10)
    # Packed pair: 2 * prompt + chosen + rejected <= T.
    out = truncate(_ex(8, 3, 5), seq_len=20, policy="truncate_prompt_left", together=True,
                   report=report)
    assert len(out.prompt) == 6 and 2 * 6 + 3 + 5 <= 20
    assert truncate(_ex(3, 12), seq_len=10, policy="truncate_prompt_left", report=report) is None
    assert report.num_examples == 4 and len(report.cut) == 3 and len(report.dropped) == 1
    assert "leaving no room for the prompt" in report.dropped[0].reason


def test_truncate_completion_drop_and_error():
    report = formatting.TruncationReport(policy="x", seq_len=10)
    out = truncate(_ex(4, 9, 3), seq_len=10, policy="truncate_completion", report=report)
    assert out.prompt.tolist() == list(range(100, 104))
    assert [c.tolist() for c in out.completions] == [list(range(200, 206)), [200, 201, 202]]
    assert truncate(_ex(10, 2), seq_len=10, policy="truncate_completion", report=report) is None
    assert truncate(_ex(4, 7, where="f:9"), seq_len=10, policy="drop", report=report) is None
    fits = _ex(4, 6)
    assert truncate(fits, seq_len=10, policy="drop", report=report) is fits
    assert [t.where for t in report.dropped] == ["w", "f:9"]
    assert report.dropped[1].reason == "needs 11 tokens > seq_len 10"
    with pytest.raises(DataError, match=r"f:3: example needs 11 tokens > seq_len 10"):
        truncate(_ex(4, 7, where="f:3"), seq_len=10, policy="error")


def test_format_records_reports_cuts_and_drops_by_line():
    records = [{"text": "a" * 3}, {"text": "b" * 30}, {"text": "c" * 5}]
    examples, report, _ = _fmt(records, "lm", seq_len=8, truncation="truncate_prompt_left")
    # Raw text has no prompt to cut: any truncate_* policy cuts the text on the right.
    assert [len(e.prompt) + len(e.completions[0]) for e in examples] == [5, 8, 7]
    assert [t.where for t in report.cut] == ["f.jsonl:2"]
    examples, report, _ = _fmt(records, "lm", seq_len=8, truncation="drop")
    assert len(examples) == 2 and report.num_kept == 2
    assert "dropped f.jsonl:2: needs 32 tokens > seq_len 8" in report.summary()


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory):
    tokenizer = pytest.importorskip("align_jax.tokenizer_training")
    corpus = ["the quick brown fox jumps over the lazy dog", "be kind and be honest",
              "what is a value? a value is what we care about"] * 20
    return tokenizer.train_tokenizer(corpus, tmp_path_factory.mktemp("tok"), vocab_size=320)


def test_sft_with_the_real_tokenizer_scores_exactly_the_answer(real_tokenizer):
    from align_jax.data import batching
    tok = real_tokenizer
    recs = [Record(data={"prompt": "what is a value?", "completion": "what we care about"},
                   where="f:1")]
    (ex,), _, _ = format_records(recs, kind="sft", tokenizer=tok, seq_len=64)
    messages = [{"role": "user", "content": "what is a value?"}]
    assert ex.prompt.tolist() == tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True))
    assert ex.prompt[0] == tok.bos_id and ex.completions[0][-1] == tok.eos_id
    batch = batching.pad_batch([batching.sequence(ex.prompt, ex.completions[0])],
                               batch_size=1, seq_len=64)
    scored = batch["targets"][0][batch["loss_mask"][0] > 0]
    assert tok.decode(scored.tolist()) == "what we care about"
    assert scored[-1] == tok.eos_id
    # prompt + completion is the template's rendering of the whole conversation.
    full = tok.apply_chat_template(
        messages + [{"role": "assistant", "content": "what we care about"}])
    assert tok.decode(batch["tokens"][0][batch["segment_ids"][0] > 0].tolist(),
                      skip_special_tokens=False) == full
