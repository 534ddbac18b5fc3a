"""A character-level stand-in for align_jax.tokenizer.Tokenizer (same contract), for data tests.

Chat template: "<s>" then "<|role|>content<|end|>" per message, then "<|assistant|>" as the
generation prompt. Each marker is one token; every other character is one token.
"""

import re

SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|user|>": 3, "<|assistant|>": 4, "<|system|>": 5,
            "<|end|>": 6}
_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class CharTokenizer:
    bos_id, eos_id, pad_id = 1, 2, 0
    eos_ids = (2,)
    vocab_size = 300

    def encode(self, text, *, add_bos=False, add_eos=False):
        ids = [self.bos_id] if add_bos else []
        for piece in _SPLIT.split(text):
            if piece in SPECIALS:
                ids.append(SPECIALS[piece])
            else:
                ids += [10 + ord(c) % 290 for c in piece]
        return ids + ([self.eos_id] if add_eos else [])

    def apply_chat_template(self, messages, *, add_generation_prompt=False):
        text = "<s>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


def chars(text):
    """Token ids of plain text (no markers)."""
    return [10 + ord(c) % 290 for c in text]
