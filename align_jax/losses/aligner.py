"""The aligner objective: next-token NLL of y' and [DONE] given `[INPUT] x [INIT] y [ALIGNED]`.

An aligner is any decoder fine-tuned on the text `[INPUT] x [INIT] y [ALIGNED] y' [DONE]`, with
the four markers added to its vocabulary as special tokens (`add_marker_tokens` grows the
embedding and an untied output matrix, and exports a checkpoint transformers reads). The loss
is `sft_loss` on a batch whose `loss_mask` covers exactly the tokens of y' and the [DONE] marker
(`data.aligner_text.aligner_example` builds it). Inference (`methods.aligners.align`): greedy
from `[INPUT] x [INIT] y [ALIGNED]`, cut at [DONE], EOS or the token budget.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np

from align_jax.data.aligner_text import DONE, MARKERS, aligner_example, marker_ids, prompt_text
from align_jax.losses.sft import sft_loss
from align_jax.models.hf import load_hf, save_hf

__all__ = ["DONE", "MARKERS", "add_marker_tokens", "aligner_example", "aligner_loss",
           "marker_ids", "prompt_text"]

aligner_loss = sft_loss  # the batch's loss_mask (aligner_text.aligner_example) selects y', [DONE]


def add_marker_tokens(src: str, dst: str, *, seed: int = 0) -> str:
    """Copies an HF decoder checkpoint to `dst` with the markers added as special tokens.

    The embedding (and an untied lm_head) gains one row per new marker, initialised to the
    mean of the existing rows plus small noise (the vocabulary grows only when the tokenizer
    outgrows the matrix). Markers already present are kept.

    Args:
      src: a Hugging Face decoder checkpoint dir (config.json, safetensors, tokenizer files).
      dst: the output dir (transformers' AutoModelForCausalLM and AutoTokenizer load it).
      seed: rng seed of the noise.
    Returns:
      dst.
    """
    from transformers import AutoTokenizer  # heavy: only adding the marker tokens needs it

    hf_tok = AutoTokenizer.from_pretrained(src, local_files_only=True,
                                           trust_remote_code=False)
    vocab = hf_tok.get_vocab()
    new = [m for m in MARKERS if m not in vocab]
    hf_tok.add_tokens(new, special_tokens=True)
    config, params = load_hf(src)
    needed = len(hf_tok)
    params = jax.device_get(params)
    if needed > config.vocab_size:
        rng = np.random.default_rng(seed)
        grow = needed - config.vocab_size
        emb = np.asarray(params["embedding"])
        rows = emb.mean(0, keepdims=True) + 0.02 * emb.std() * rng.standard_normal(
            (grow, emb.shape[1]))
        params["embedding"] = np.concatenate([emb, rows.astype(emb.dtype)], axis=0)
        if "lm_head" in params:
            head = np.asarray(params["lm_head"])
            cols = head.mean(1, keepdims=True) + 0.02 * head.std() * rng.standard_normal(
                (head.shape[0], grow))
            params["lm_head"] = np.concatenate([head, cols.astype(head.dtype)], axis=1)
        config = dataclasses.replace(config, vocab_size=needed)
    os.makedirs(dst, exist_ok=True)
    save_hf(config, params, dst)
    hf_tok.save_pretrained(dst)
    for name in ("chat_template.jinja",):
        if os.path.exists(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
            shutil.copy(os.path.join(src, name), dst)
    with open(os.path.join(dst, "aligner_markers.json"), "w") as f:
        json.dump({"markers": list(MARKERS), "added": new}, f)
    return dst
