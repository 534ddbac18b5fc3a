"""Host-side layout of many prompts into a few fixed, left-padded batch shapes.

Prompts are sorted by length and cut into batches of `batch_size` rows; each batch's prompt
length is rounded up to a power of two (at least `min_bucket`), and a short last batch is
filled with inert rows. So a call with any number of prompts compiles at most one prefill and
one decode per distinct padded length, and the shapes repeat across calls.

Left padding: row b holds its prompt in the last len_b slots. Pad slots get segment id 0 (the
model ignores them) and position 0; real tokens get positions 0..len_b-1, and decode continues
at len_b, exactly as if the prompt were alone.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

DEFAULT_BATCH_SIZE = 32
MIN_BUCKET = 16


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptBatch:
    """One padded batch.

    indices: original prompt index of each real row (the first len(indices) rows).
    tokens_BT, positions_BT, segment_ids_BT: int32 [B, T] left-padded arrays.
    lengths_B: prompt length per row (1 for inert filler rows).
    active_B: bool, False for filler rows.
    prefix_1T: None, or int32 [1, P]: the first P tokens, common to every real row, that the
      prefill runs once for the whole batch (`align_jax.generate.prefix`); the layout above
      is the same either way.
    """

    indices: tuple[int, ...]
    tokens_BT: np.ndarray
    positions_BT: np.ndarray
    segment_ids_BT: np.ndarray
    lengths_B: np.ndarray
    active_B: np.ndarray
    prefix_1T: np.ndarray | None = None


def validate_prompts(prompts: Sequence[Sequence[int]], *, max_new_tokens: int, max_len: int,
                     vocab_size: int) -> list[list[int]]:
    """Checks every prompt fits the cache and the vocabulary; returns them as int lists."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token")
        if len(p) + max_new_tokens > max_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} cache slots but the cache holds max_len={max_len}")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside [0, {vocab_size})")
        out.append(p)
    return out


def bucket_length(n: int, *, cap: int, min_bucket: int = MIN_BUCKET) -> int:
    """Padded prompt length: the next power of two >= n (and >= min_bucket), at most cap."""
    return max(n, min(max(next_pow2(n), min_bucket), cap))


def plan_batches(prompts: Sequence[Sequence[int]], *, batch_size: int, cap: int,
                 pad_id: int = 0, min_bucket: int = MIN_BUCKET,
                 order_key: Sequence | None = None) -> list[PromptBatch]:
    """Sorts prompts by length and lays them out as left-padded batches of `batch_size` rows.

    Args:
      prompts: token id lists (already validated).
      batch_size: rows per batch (filler rows complete the last batch).
      cap: the longest padded prompt length allowed (max_len - max_new_tokens).
      pad_id: token id written in pad slots (never attended).
      order_key: optional, one sortable value per prompt: prompts are then sorted by their
        padded length first and by this key within it, so batches hold alike rows (e.g.
        rows whose scored continuations are alike in number and length).
    Returns:
      the batches, shortest prompts first.
    """
    if order_key is None:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    else:
        order = sorted(range(len(prompts)), key=lambda i: (
            bucket_length(len(prompts[i]), cap=cap, min_bucket=min_bucket), order_key[i],
            len(prompts[i])))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        t = bucket_length(max(len(prompts[i]) for i in idx), cap=cap, min_bucket=min_bucket)
        batches.append(layout(prompts, idx, batch_size=batch_size, length=t, pad_id=pad_id))
    return batches


def layout(prompts: Sequence[Sequence[int]], idx: Sequence[int], *, batch_size: int,
           length: int, pad_id: int = 0) -> PromptBatch:
    """The prompts `idx` left-padded into one batch of `batch_size` rows and `length` slots.

    Args:
      prompts: token id lists (already validated); idx: the ones in this batch, in row order.
      batch_size: rows (filler rows complete the batch); length: slots, >= every prompt.
      pad_id: token id written in pad slots (never attended).
    Returns:
      the PromptBatch (no shared prefix).
    """
    tokens = np.full((batch_size, length), pad_id, np.int32)
    positions = np.zeros((batch_size, length), np.int32)
    segments = np.zeros((batch_size, length), np.int32)
    lengths = np.ones((batch_size,), np.int32)
    active = np.zeros((batch_size,), bool)
    for row, i in enumerate(idx):
        n = len(prompts[i])
        tokens[row, length - n:] = prompts[i]
        positions[row, length - n:] = np.arange(n)
        segments[row, length - n:] = 1
        lengths[row], active[row] = n, True
    # Filler rows: one real-looking token so their attention is well defined; they start
    # done and never keep the decode loop alive.
    segments[len(idx):, -1] = 1
    return PromptBatch(indices=tuple(idx), tokens_BT=tokens, positions_BT=positions,
                       segment_ids_BT=segments, lengths_B=lengths, active_B=active)
