"""The aligner objective: next-token NLL of y' and [DONE] given `x [INIT] y [ALIGNED]`.

An aligner is any decoder fine-tuned on the text `x [INIT] y [ALIGNED] y' [DONE]`, with the
markers added to its vocabulary as special tokens (`add_marker_tokens` grows the embedding and
an untied output matrix, and exports a checkpoint transformers reads). The loss is `sft_loss` on
a batch whose `loss_mask` covers exactly the tokens of y' and the [DONE] marker
(`aligner_example` builds it). Inference (`align`): greedy from `x [INIT] y [ALIGNED]`, cut at
[DONE], EOS or the token budget.
"""

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from align_jax.losses.sft import sft_loss

INIT, ALIGNED, DONE = "[INIT]", "[ALIGNED]", "[DONE]"
MARKERS = (INIT, ALIGNED, DONE)

aligner_loss = sft_loss  # the batch's loss_mask (from aligner_example) selects y' and [DONE]


def prompt_text(x: str, y: str) -> str:
    """The aligner's prompt: `x [INIT] y [ALIGNED]`."""
    return f"{x} {INIT} {y} {ALIGNED}"


def marker_ids(tokenizer) -> dict[str, int]:
    """The ids of the markers; a clear error when the tokenizer lacks them."""
    out = {}
    for m in MARKERS:
        try:
            ids = tokenizer.encode(m)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure means "not prepared"
            raise ValueError(f"tokenizer {tokenizer.path} cannot encode {m}: {e}") from e
        if len(ids) != 1:
            raise ValueError(f"tokenizer {tokenizer.path} has no single token for {m}; prepare "
                             f"the base model with losses.aligner.add_marker_tokens")
        out[m] = ids[0]
    return out


def prompt_ids(tokenizer, x: str, y: str) -> list[int]:
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + list(tokenizer.encode(prompt_text(x, y)))


def aligner_example(tokenizer, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, completion ids) of one triple; the completion is y' then [DONE] (no EOS).

    Args:
      tokenizer: a tokenizer with the markers (see add_marker_tokens).
      record: an aligner triple {input, initial_response, aligned_response, ...}.
    Returns:
      int32 arrays; the loss covers the completion only.
    """
    done = marker_ids(tokenizer)[DONE]
    prompt = prompt_ids(tokenizer, record["input"], record["initial_response"])
    completion = list(tokenizer.encode(" " + record["aligned_response"])) + [done]
    return np.asarray(prompt, np.int32), np.asarray(completion, np.int32)


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
    from transformers import AutoTokenizer

    from align_jax.models.hf import load_hf, save_hf

    hf_tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
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
        import dataclasses
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


def align(config, params, tokenizer, inputs: Sequence[str], responses: Sequence[str], *,
          max_new_tokens: int = 256, mesh=None, batch_size: int | None = None) -> list[str]:
    """Aligned responses: greedy from `x [INIT] y [ALIGNED]`, cut at [DONE], EOS or the budget.

    Args:
      config, params, tokenizer: a trained aligner (its tokenizer has the markers).
      inputs, responses: the (x, y) rows.
      max_new_tokens: the budget.
      mesh: optional device mesh for generation.
      batch_size: rows decoded together (default: generate's).
    Returns:
      y' per row, stripped.
    """
    from align_jax.generate import generate

    if len(inputs) != len(responses):
        raise ValueError(f"align: {len(inputs)} inputs but {len(responses)} responses")
    if not inputs:
        return []
    done = marker_ids(tokenizer)[DONE]
    prompts = [prompt_ids(tokenizer, x, y) for x, y in zip(inputs, responses)]
    out = generate(config, params, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                   stop_token_ids=(done,), tokenizer=tokenizer, mesh=mesh,
                   batch_size=batch_size)
    stops = {done, *tokenizer.eos_ids}
    texts = []
    for ids in out.tokens:
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        texts.append(tokenizer.decode(ids[:cut]).strip())
    return texts
