"""Completions scored from a prompt's prefill cache (`generate(continuations=...)`,
`score_continuations`): their batch layout and the cache extension inside the prefill.

Each completion extends a copy of its prompt's KV cache, cut or padded to exactly prompt +
completion slots; its first token is scored by the prompt's last hidden state, the rest by
its own hidden states. So a prompt is run once for all of its completions, and for the
generation that follows.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.generate import prompt_batches
from align_jax.losses import logprobs as logprobs_lib
from align_jax.models import transformer
from align_jax.models.config import ModelConfig

# A batch's scored continuations are padded to a multiple of this: few compiled shapes, with
# less padding than a power of two.
CONTINUATION_ROUND = 16


def resize_slots(cache, slots: int):
    """The cache cut or zero-padded (empty slots) to `slots` slots."""
    have = cache["segment_ids"].shape[1]
    if have >= slots:
        return {**{n: cache[n][:, :, :slots] for n in ("k", "v")},
                "segment_ids": cache["segment_ids"][:, :slots], "index": cache["index"]}
    pad = slots - have
    return {**{n: jnp.pad(cache[n], [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (cache[n].ndim - 3))
               for n in ("k", "v")},
            "segment_ids": jnp.pad(cache["segment_ids"], ((0, 0), (0, pad))),
            "index": cache["index"]}


def continuation_logps(decoder, params, config: ModelConfig, h_last_BD, w_DV, cache, next_pos_B,
                        cont_BKA, cont_mask_BKA, *, prompt_len: int) -> jax.Array:
    """log p(continuation | prompt) [B, K] for K right-padded continuations of each prompt.

    Each continuation extends a copy of the prompt's cache: its first token is scored by the
    prompt's last hidden state, the rest by the continuation's own hidden states, so the
    prompt is run once for all K (and for the generation that follows).
    """
    _, k, a = cont_BKA.shape
    chunk = logprobs_lib.resolve_vocab_chunk(config.vocab_size, 0)
    # The extension's own copy of the cache holds exactly the prompt and the continuation:
    # the generation's decode slots would only add attention work (or be too few).
    cache = resize_slots(cache, prompt_len + a)
    sums = []
    for j in range(k):
        tokens_BA, mask_BA = cont_BKA[:, j], cont_mask_BKA[:, j]
        positions_BA = next_pos_B[:, None] + jnp.arange(a, dtype=jnp.int32)[None]
        h_BAD, _ = decoder.apply({"params": params}, tokens_BA, positions_BA,
                                 mask_BA.astype(jnp.int32), cache,
                                 method=transformer.Decoder.hidden)
        # The hidden state before each continuation token scores it.
        h_BAD = jnp.concatenate([h_last_BD[:, None], h_BAD[:, :-1]], axis=1)
        if chunk:
            logps_BA = logprobs_lib.chunked_token_logps(h_BAD, w_DV, tokens_BA, chunk_size=chunk)
        else:
            logits_BAV = jnp.einsum("BAD,DV->BAV", h_BAD, w_DV,
                                    preferred_element_type=jnp.float32)
            logps_BA = logprobs_lib.token_logps(logits_BAV, tokens_BA)
        sums.append(jnp.sum(jnp.where(mask_BA, logps_BA, 0.0), axis=-1))
    return jnp.stack(sums, axis=1)


@dataclasses.dataclass(frozen=True)
class Continuations:
    """Continuations to score, one list of token-id lists per prompt.

    A batch lays its rows' continuations out as [B, K, A]: K the most continuations of one
    of its rows, A its longest continuation rounded up to CONTINUATION_ROUND. `sort_key`
    groups prompts with alike (K, A) into the same batches (within a prompt bucket), so
    little of the extension is padding.
    """

    items: list[list[list[int]]]

    @classmethod
    def make(cls, continuations, n_prompts: int, prompts, *, max_len: int, vocab_size: int):
        if len(continuations) != n_prompts:
            raise ValueError(f"continuations has {len(continuations)} entries for {n_prompts} "
                             "prompts")
        items = []
        for i, conts in enumerate(continuations):
            row = []
            for j, c in enumerate(conts):
                c = [int(t) for t in c]
                if not c:
                    raise ValueError(f"continuation {j} of prompt {i} is empty")
                bad = [t for t in c if not 0 <= t < vocab_size]
                if bad:
                    raise ValueError(f"continuation {j} of prompt {i} has token id {bad[0]} "
                                     f"outside [0, {vocab_size})")
                if len(prompts[i]) + len(c) > max_len:
                    raise ValueError(f"prompt {i} ({len(prompts[i])} tokens) and its "
                                     f"continuation {j} ({len(c)} tokens) exceed max_len="
                                     f"{max_len}")
                row.append(c)
            items.append(row)
        return cls(items=items)

    def sort_key(self) -> list[tuple[int, int]]:
        return [(len(row), max(map(len, row), default=0)) for row in self.items]

    def arrays(self, batch: prompt_batches.PromptBatch, pad_id: int):
        """([B, K, A] tokens, [B, K, A] bool mask) for a batch's rows (filler rows empty)."""
        rows = [self.items[i] for i in batch.indices]
        k = max(1, max(map(len, rows), default=1))
        longest = max((len(c) for row in rows for c in row), default=1)
        a = -(-longest // CONTINUATION_ROUND) * CONTINUATION_ROUND
        b = len(batch.active_B)
        tokens = np.full((b, k, a), pad_id, np.int32)
        mask = np.zeros((b, k, a), bool)
        for r, row in enumerate(rows):
            for j, c in enumerate(row):
                tokens[r, j, :len(c)], mask[r, j, :len(c)] = c, True
        return tokens, mask


def row_scores(cont, scores_BK, batch, row) -> tuple[float, ...] | None:
    if cont is None:
        return None
    return tuple(float(x) for x in scores_BK[row, :len(cont.items[batch.indices[row]])])
