"""Per-token log-probs of a token sequence, with the top alternatives at each position: what
the server answers for `logprobs`, `top_logprobs` and `echo`.

One teacher-forced forward pass over prompt + completion after generation (the decode loop
keeps only the chosen tokens' log-probs, not the distributions), under the model's raw
distribution: log_softmax of the unmodified logits (temperature 1, no penalty or filter), as
`generate`'s own log-probs and `score_continuations` are. The sequence is padded to a
power-of-two length, so a few programs serve every length (kept in `shape_cache`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import sharding
from align_jax.generate import shape_cache
from align_jax.generate.prompt_batches import bucket_length
from align_jax.models import transformer

# Most alternatives per position a request may ask for (OpenAI allows 20 on chat).
MAX_TOP = 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenScores:
    """For positions 1..T-1 of a sequence: logps[t-1] = log p(seq[t] | seq[:t]), and the
    `top` most likely ids at that position with their log-probs (best first)."""

    logps: list[float]
    top_ids: list[list[int]]
    top_logps: list[list[float]]


def _scores(params, tokens_BT, segment_ids_BT, *, config, top, mesh, rules):
    with sharding.use_mesh(mesh, rules):
        logits_BTV = transformer.forward(config, params, tokens_BT,
                                         segment_ids_BT=segment_ids_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    chosen_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    if not top:
        return chosen_BT, None, None
    top_BTK, ids_BTK = jax.lax.top_k(logp_BTV, top)
    return chosen_BT, top_BTK, ids_BTK


jit_scores = shape_cache.ShapeCache(_scores, static_argnames=("config", "top", "mesh", "rules"))


def token_scores(config, params, seq: list[int], *, top: int, max_len: int, mesh=None,
                 rules="fsdp") -> TokenScores:
    """Log-probs of each token of `seq` given the ones before it, and the `top` alternatives.

    Args:
      config, params: the model.  seq: token ids (at least 2, at most max_len).
      top: alternatives per position, 0..MAX_TOP.  max_len: the context length.
      mesh, rules: as in `generate`.
    Returns:
      TokenScores for positions 1..len(seq)-1.
    """
    if not 0 <= top <= MAX_TOP:
        raise ValueError(f"top={top} is outside 0..{MAX_TOP}")
    n = len(seq)
    t = bucket_length(n, cap=max_len)
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :n] = seq
    segments = np.zeros((1, t), np.int32)
    segments[0, :n] = 1  # pads after the sequence: causal attention never reaches them
    # Top alternatives are computed for MAX_TOP whenever any are asked for: one program.
    k = MAX_TOP if top else 0
    chosen, top_v, top_i = sharding.fetch(jit_scores(params, tokens, segments, config=config,
                                                     top=min(k, config.vocab_size),
                                                     mesh=mesh, rules=rules))
    logps = np.asarray(chosen)[0, :n - 1].tolist()
    if not top:
        return TokenScores(logps=logps, top_ids=[[] for _ in logps],
                           top_logps=[[] for _ in logps])
    return TokenScores(logps=logps, top_ids=np.asarray(top_i)[0, :n - 1, :top].tolist(),
                       top_logps=np.asarray(top_v)[0, :n - 1, :top].tolist())
