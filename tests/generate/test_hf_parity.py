"""Greedy generation equals transformers' `generate` on tiny random models of each family."""

import dataclasses

import hf_models
import numpy as np
import pytest
import torch

from align_jax.generate import generate
from align_jax.models.hf import load_hf

NEW_TOKENS = 32
PROMPTS = [[5, 17, 33, 8], [40, 41, 9, 60, 2, 71, 12, 13, 88, 90, 3], [64], [22, 23, 24, 25, 26]]


def _hf_greedy(model, prompts, *, pad_id, eos_id):
    """transformers' batched greedy generate with left padding; new tokens per row, cut after
    the first EOS (transformers pads finished rows afterwards)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=0, do_sample=False, pad_token_id=pad_id,
                             eos_token_id=eos_id)
    rows = []
    for row in out[:, width:].tolist():
        if eos_id in row:
            row = row[:row.index(eos_id) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_greedy_matches_transformers_generate(family, tmp_path):
    model = hf_models.save_tiny_hf(family, tmp_path)
    config, params = load_hf(str(tmp_path))
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    # The full 32-token continuations, EOS ignored (transformers is told to stop on an id no
    # model here can produce).
    out = generate(config, params, PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    never = model.config.vocab_size + 7
    assert out.tokens == _hf_greedy(model, PROMPTS, pad_id=pad_id, eos_id=never), family
    assert all(len(t) == NEW_TOKENS for t in out.tokens)
    # Stopping: make a token that row 0 produces mid-way the EOS of both implementations.
    eos_id = out.tokens[0][NEW_TOKENS // 2]
    expected = _hf_greedy(model, PROMPTS, pad_id=pad_id, eos_id=eos_id)
    stopped = generate(dataclasses.replace(config, eos_token_id=eos_id), params, PROMPTS,
                       max_new_tokens=NEW_TOKENS)
    assert stopped.tokens == expected, family
    assert stopped.finish_reasons == ["stop" if eos_id in t else "length" for t in expected]
    assert stopped.finish_reasons[0] == "stop"
    # Left padding must not matter: the longest prompt alone gives the same tokens.
    alone = generate(config, params, [PROMPTS[1]], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert alone.tokens[0] == out.tokens[1]
    np.testing.assert_allclose(alone.logprobs[0], out.logprobs[1], atol=1e-4)
