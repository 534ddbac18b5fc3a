"""Multi-turn `messages`: every assistant turn scored, everything between them masked."""

import pathlib
import sys

import numpy as np
import pytest
from data_char_tokenizer import CharTokenizer, chars

from align_jax.data import batching, formats
from align_jax.data.formatting import format_records, render_prompt, truncate
from align_jax.data.sources import DataError, Record
from align_jax.tokenizer import load_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tokenizer_families import build_family_tokenizer  # noqa: E402

# SmolLM2-135M-Instruct's own chat template (the `tokenizer.chat_template` of its GGUF), on an
# offline byte-level BPE tokenizer with SmolLM2's special tokens (tests/tokenizer_families.py).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

CHAT = [{"role": "system", "content": "Be kind."},
        {"role": "user", "content": "The sky is blue?"},
        {"role": "assistant", "content": "Once upon a time, yes."},
        {"role": "user", "content": "And the grass?"},
        {"role": "assistant", "content": "The grass is green."},
        {"role": "user", "content": "Values?"},
        {"role": "assistant", "content": "Honesty, care and respect."}]


@pytest.fixture(scope="module")
def smol_tok(tmp_path_factory):
    path = build_family_tokenizer("smollm2", str(tmp_path_factory.mktemp("smollm2_tok")))
    return load_tokenizer(path, chat_template=SMOLLM2_TEMPLATE)


def _one(tok, record):
    (ex,), _, _ = format_records([Record(data=record, where="f.jsonl:1")], kind="sft",
                                 tokenizer=tok, seq_len=4096)
    return ex


def _assistant_spans(tok, ids):
    """TRL's assistant_only_loss mask, found independently in the whole rendered chat: each
    assistant turn's content from after `<|im_start|>assistant\\n` through its `<|im_end|>`."""
    header = tok.encode("<|im_start|>assistant\n")
    end = tok.encode("<|im_end|>")[0]
    mask, i = np.zeros(len(ids), np.float32), 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            while ids[j] != end:
                j += 1
            mask[i + len(header):j + 1] = 1.0
            i = j
        i += 1
    return mask


def _check_multi_turn(tok, chat):
    ex = _one(tok, {"messages": chat})
    tokens, scored = batching.sequence(ex.prompt, ex.completions[0], completion_scored=ex.scored)
    full = tok.encode(tok.apply_chat_template(chat))
    # The sequence is the whole rendered chat, bar the template's newline after the last turn.
    assert tokens.tolist() == full[:len(tokens)]
    assert tok.decode(full[len(tokens):]) == "\n"
    expect = _assistant_spans(tok, full)[:len(tokens)]
    np.testing.assert_array_equal(scored, expect)
    assert expect.sum() == sum(len(tok.encode(m["content"])) + 1
                               for m in chat if m["role"] == "assistant")
    # Through the batch builder: loss_mask[t] scores target t + 1.
    batch = formats.FORMATS["sft"].build([ex], batch_size=2, seq_len=len(tokens) + 3,
                                         pad_id=tok.pad_id)
    np.testing.assert_array_equal(batch["loss_mask"][0, :len(tokens) - 1], expect[1:])
    assert batch["loss_mask"][0, len(tokens) - 1:].sum() == 0 and batch["loss_mask"][1].sum() == 0


def test_every_assistant_turn_is_scored_with_smollm2_template(smol_tok):
    _check_multi_turn(smol_tok, CHAT)
    # Without a system turn the template writes its default one into the (unscored) prompt.
    _check_multi_turn(smol_tok, CHAT[1:])


def test_single_turn_tokens_are_unchanged(smol_tok):
    _check_single_turn(smol_tok)


def _check_single_turn(smol_tok):
    # The prompt + completion formula of before: template with the generation prompt, then
    # the answer and EOS, every answer token scored.
    for chat in (CHAT[:3], CHAT[1:3]):
        ex = _one(smol_tok, {"messages": chat})
        prompt = smol_tok.encode(smol_tok.apply_chat_template(chat[:-1],
                                                              add_generation_prompt=True))
        assert ex.prompt.tolist() == prompt
        assert ex.completions[0].tolist() == smol_tok.encode(chat[-1]["content"]) + [
            smol_tok.eos_id]
        assert ex.scored is None
    same = _one(smol_tok, {"prompt": CHAT[1]["content"], "completion": CHAT[2]["content"]})
    ex = _one(smol_tok, {"messages": CHAT[1:3]})
    assert same.prompt.tolist() == ex.prompt.tolist()
    assert same.completions[0].tolist() == ex.completions[0].tolist()
    assert ex.prompt.tolist() == render_prompt(smol_tok, CHAT[1:2]).tolist()


# Rebuilding the tokenizer from the GGUF (transformers' converter) takes ~25 s of CPU.
@pytest.mark.slow
def test_real_smollm2_tokenizer(tmp_path):
    from align_jax.models import gguf, named

    try:
        path = named._package_file("smollm2-135m-instruct",
                                   named.NAMED_MODELS["smollm2-135m-instruct"])
    except FileNotFoundError as e:
        pytest.skip(str(e))
    gguf._save_gguf_tokenizer(path, str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_template == SMOLLM2_TEMPLATE  # the fast tests' template is the real one
    _check_multi_turn(tok, CHAT)
    _check_multi_turn(tok, CHAT[1:])
    _check_single_turn(tok)


def test_char_template_between_turns_and_truncation():
    tok = CharTokenizer()
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ex = _one(tok, {"messages": msgs})
    # <s><|user|>a<|end|><|assistant|> | b</s> <|end|><|user|>c<|end|><|assistant|> d</s>
    assert ex.prompt.tolist() == [1, 3, *chars("a"), 6, 4]
    assert ex.completions[0].tolist() == [*chars("b"), 2, 6, 3, *chars("c"), 6, 4, *chars("d"), 2]
    assert ex.scored.tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 1]
    cut = truncate(ex, seq_len=len(ex.prompt) + 4, policy="truncate_completion")
    assert cut.scored.tolist() == [1, 1, 0, 0] and len(cut.completions[0]) == 4
    # UltraChat rows: the first user turn also as `prompt`, the chat in `messages`.
    ultra = _one(tok, {"prompt": "a", "prompt_id": "p1", "messages": msgs})
    assert ultra.completions[0].tolist() == ex.completions[0].tolist()
    assert ultra.scored.tolist() == ex.scored.tolist()


def test_template_that_rewrites_turns_is_refused():
    class Stripping(CharTokenizer):
        def apply_chat_template(self, messages, *, add_generation_prompt=False):
            return super().apply_chat_template(
                [{**m, "content": m["content"].strip()} for m in messages],
                add_generation_prompt=add_generation_prompt)

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(DataError, match="f.jsonl:1: field 'messages': the chat template does "
                                        "not render"):
        _one(Stripping(), {"messages": msgs})
