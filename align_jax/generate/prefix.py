"""Shared-prefix prefill: a prefix common to every prompt of a batch is run once, not per row.

Few-shot prompts (an SDG template: instructions and examples, then a short per-prompt part)
share most of their tokens. When they do, the prefill runs the first P tokens once, at batch
1, copies their keys and values into each row of the batch's cache, and runs only the last
T - P slots of the batch with that cache.

Layout: the batch's cache is exactly the left-padded layout of an unshared batch of T slots
(`prompt_batches.layout`): row b holds its prompt in the last n_b slots, so a slot's distance
to another equals the distance of their positions (the sliding window, which the model
measures in slots, stays right) and the decode loop is unchanged. T = P + T_s, where the
suffix block T_s is the longest suffix bucketed like a prompt length. Slot j < P of row b
holds prompt token j - pad_b (pad_b = T - n_b), which lies in the shared prefix: its keys and
values are gathered from slot j - pad_b of the prefix pass. A row with pad_b > 0 has its
last pad_b prefix tokens inside the suffix block, where the suffix pass recomputes them in
slots that an unshared batch would spend on padding anyway. Positions are those of the
unshared layout: a token at position p gets position p.

P is static: the common prefix (capped so every row keeps one token for the suffix pass,
whose last slot gives the first sampled token) rounded down to at most four significant
bits, so different prefixes of one size share compilations. The prefix pass at batch 1 is
replicated over the mesh's batch axes (`sharding.constrain` drops axes a dimension of 1
cannot split); each row gathers its copy on its own device.

When it applies (`share_prefix`): None (the default) shares when at least two rows have a
common prefix of MIN_SHARED tokens and the prefill then runs at most PAYOFF of the tokens of
the unshared layout, and not for a mixture of experts that can drop tokens (its per-row
capacity depends on the tokens of a pass, so routing would differ); True shares whenever
the rows have a common token (each row keeps at least one token for the suffix pass); False
never. Sharing adds compiled shapes of its own (one per prefix size and suffix bucket): a
long run of one template compiles them once.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.generate import prompt_batches
from align_jax.models import transformer
from align_jax.models.config import ModelConfig

# Automatic sharing: at least this many common tokens, and the prefill's token count
# (prefix once, plus every row's suffix block) at most this share of the unshared count.
MIN_SHARED = 16
PAYOFF = 0.75
# Prompts are grouped by their first tokens within a length bucket, so that batches hold
# prompts of one template.
GROUP_TOKENS = 16


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """The length of the longest token prefix common to all `rows` (0 for none)."""
    if not rows:
        return 0
    first = np.asarray(rows[0], np.int32)
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        diff = np.flatnonzero(first[:n] != np.asarray(r[:n], np.int32))
        if diff.size:
            n = int(diff[0])
    return n


def round_prefix(n: int) -> int:
    """The largest length <= n with at most four significant bits (8 sizes an octave)."""
    if n < 16:
        return max(int(n), 0)
    drop = int(n).bit_length() - 4
    return (int(n) >> drop) << drop


def order_key(prompts: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """A sort key per prompt that puts prompts of one template next to each other."""
    return [tuple(p[:GROUP_TOKENS]) for p in prompts]


def _pays(config: ModelConfig, *, prefix: int, rows: int, active: int, suffix_len: int,
          unshared_len: int) -> bool:
    if config.num_experts and config.capacity_factor * config.experts_per_token \
            < config.num_experts:
        return False
    if active < 2 or prefix < MIN_SHARED:
        return False
    return prefix + rows * suffix_len <= PAYOFF * rows * unshared_len


def share(batch: prompt_batches.PromptBatch, prompts: Sequence[Sequence[int]], *,
          config: ModelConfig, mode: bool | None, cap: int, pad_id: int,
          min_bucket: int = prompt_batches.MIN_BUCKET) -> prompt_batches.PromptBatch:
    """The batch laid out for a shared-prefix prefill, or unchanged when it does not apply.

    Args:
      batch: a batch of `prompt_batches.plan_batches`.
      prompts: all prompts (the batch's `indices` point into them).
      config: the model (a mixture of experts that can drop tokens is not shared by default).
      mode: None (when it pays off), True (whenever the rows share a token) or False.
      cap: the longest padded prompt length allowed.
      pad_id, min_bucket: as in `plan_batches`.
    Returns:
      a PromptBatch whose `prefix_1T` holds the shared tokens, or `batch`.
    """
    if mode is False:
        return batch
    rows = [prompts[i] for i in batch.indices]
    shortest = min(len(r) for r in rows)
    prefix = round_prefix(min(common_prefix_len(rows), shortest - 1))
    if prefix < 1:
        return batch
    longest = max(len(r) for r in rows)
    suffix_len = prompt_batches.bucket_length(longest - prefix, cap=cap - prefix,
                                              min_bucket=min_bucket)
    n_rows = len(batch.active_B)
    if mode is None and not _pays(config, prefix=prefix, rows=n_rows, active=len(rows),
                                  suffix_len=suffix_len,
                                  unshared_len=batch.tokens_BT.shape[1]):
        return batch
    shared = prompt_batches.layout(prompts, batch.indices, batch_size=n_rows,
                                   length=prefix + suffix_len, pad_id=pad_id)
    return prompt_batches.PromptBatch(
        indices=shared.indices, tokens_BT=shared.tokens_BT, positions_BT=shared.positions_BT,
        segment_ids_BT=shared.segment_ids_BT, lengths_B=shared.lengths_B,
        active_B=shared.active_B, prefix_1T=np.asarray([rows[0][:prefix]], np.int32))


def shared_tokens(batch: prompt_batches.PromptBatch, row: int) -> int:
    """How many of a row's prompt tokens took their keys and values from the prefix pass."""
    if batch.prefix_1T is None:
        return 0
    pad = batch.tokens_BT.shape[1] - int(batch.lengths_B[row])
    return max(0, batch.prefix_1T.shape[1] - pad)


def prefill_cache(params, prefix_1T: jax.Array, positions_BT: jax.Array,
                  segment_ids_BT: jax.Array, *, config: ModelConfig, cache_len: int
                  ) -> dict[str, jax.Array]:
    """The batch's cache with its first P slots filled from one pass over the prefix.

    Traced inside the prefill. Args: the model's params; prefix_1T: the shared tokens [1, P];
    positions_BT, segment_ids_BT: the batch's whole layout [B, T]; cache_len: the cache's
    slots. Returns: a `transformer.init_cache` cache of B rows whose slots [0, P) hold each
    row's prefix tokens (see the module docstring), with index P.
    """
    p = prefix_1T.shape[1]
    b = positions_BT.shape[0]
    decoder = transformer.Decoder(config)
    positions_1T = jnp.arange(p, dtype=jnp.int32)[None]
    _, own = decoder.apply({"params": params}, prefix_1T, positions_1T,
                           jnp.ones_like(prefix_1T), transformer.init_cache(config, 1, p),
                           method=transformer.Decoder.hidden)
    # Slot j < P of row b holds the prefix token at its position there (pad slots: segment
    # 0, masked whatever they hold). One gather per row from the replicated prefix cache.
    src_BP = positions_BT[:, :p]
    cache = transformer.init_cache(config, b, cache_len)
    out = {"segment_ids": jax.lax.dynamic_update_slice_in_dim(
        cache["segment_ids"], segment_ids_BT[:, :p], 0, axis=1), "index": jnp.int32(p)}
    for name in ("k", "v"):
        rows_LBPKH = own[name][:, 0][:, src_BP]
        out[name] = jax.lax.dynamic_update_slice_in_dim(cache[name], rows_LBPKH, 0, axis=2)
    return out
