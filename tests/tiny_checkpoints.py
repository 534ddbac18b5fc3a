"""A random tiny align_jax model with a tokenizer trained on the example document, saved as a
Hugging Face checkpoint dir: the base model of recipe tests."""

import pathlib

import jax

from align_jax.models.config import get_config
from align_jax.models.hf import save_hf
from align_jax.models.transformer import init_params
from align_jax.tokenizer_training import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_document_model(base: pathlib.Path, *, vocab_size: int = 400) -> pathlib.Path:
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines() if x]
    tok = train_tokenizer(lines, base, vocab_size=vocab_size)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_hf(cfg, init_params(cfg, jax.random.key(0)), str(base))
    return base
