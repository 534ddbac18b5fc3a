"""Token sequences -> fixed-shape numpy batches (the Batches contract in the brief).

Every builder writes sequences with one primitive, `_place`: tokens at [o, o+L), targets shifted
by one inside the sequence (the last token of a segment predicts nothing, so no target ever
crosses a segment boundary), loss_mask 1 where the *target* is a scored token, positions restarting
at 0, and a segment id > 0 (0 = padding). Padded batches hold one sequence per row; packed batches
hold several, placed first-fit, and never split a sequence across rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from align_jax.data.formatting import Example, SamiExample


def sequence(prompt: np.ndarray, completion: np.ndarray, *,
             completion_scored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates a prompt (unscored) and a completion (scored).

    Args:
      prompt, completion: int token arrays.
      completion_scored: 1/0 per completion token (`Example.scored`); None scores them all.
    Returns:
      (tokens int32 [L], scored float32 [L]) where scored[k] = 1 if token k is a scored target.
    """
    tokens = np.concatenate([np.asarray(prompt, np.int32), np.asarray(completion, np.int32)])
    scored = np.concatenate([
        np.zeros(len(prompt), np.float32),
        np.ones(len(completion), np.float32) if completion_scored is None
        else np.asarray(completion_scored, np.float32)])
    return tokens, scored


def _empty(shape, pad_id):
    return {
        "tokens": np.full(shape, pad_id, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
    }


def _place(batch, index, offset, tokens, scored, segment_id):
    """Writes one sequence into batch[key][index][offset:offset + L]."""
    n = len(tokens)
    seq_len = batch["tokens"][index].shape[-1]
    if offset + n > seq_len:
        raise ValueError(
            f"sequence of {n} tokens at offset {offset} does not fit seq_len {seq_len}")
    sl = slice(offset, offset + n)
    batch["tokens"][index][sl] = tokens
    batch["targets"][index][offset:offset + n - 1] = tokens[1:]
    batch["loss_mask"][index][offset:offset + n - 1] = scored[1:]
    batch["positions"][index][sl] = np.arange(n, dtype=np.int32)
    batch["segment_ids"][index][sl] = segment_id


def _check_rows(n, batch_size):
    if n > batch_size:
        raise ValueError(f"{n} examples do not fit batch_size {batch_size}")


def pad_batch(seqs: Sequence[tuple[np.ndarray, np.ndarray]], *, batch_size: int, seq_len: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
    """One sequence per row, right-padded.

    Args:
      seqs: (tokens, scored) pairs from `sequence`, at most batch_size.
      batch_size, seq_len: B, T.
      pad_id: token written in padding (its loss_mask and segment id are 0).
    Returns:
      LM batch: tokens, targets, loss_mask, positions, segment_ids, each [B, T]; rows past
      len(seqs) are all padding.
    """
    _check_rows(len(seqs), batch_size)
    batch = _empty((batch_size, seq_len), pad_id)
    for i, (tokens, scored) in enumerate(seqs):
        _place(batch, i, 0, tokens, scored, 1)
    return batch


class FirstFitPacker:
    """Assigns items of given lengths to the first of `num_rows` rows with room (first-fit)."""

    def __init__(self, *, num_rows: int, seq_len: int, max_items_per_row: int | None = None):
        self.seq_len = seq_len
        self.max_items = max_items_per_row
        self.used = [0] * num_rows
        self.rows: list[list[int]] = [[] for _ in range(num_rows)]
        self._count = 0

    def add(self, length: int) -> int | None:
        """Places the next item; returns its row, or None when no row has room (nothing changes)."""
        if length > self.seq_len:
            raise ValueError(f"item of {length} tokens exceeds seq_len {self.seq_len}; "
                             "truncate it first")
        for r, used in enumerate(self.used):
            if used + length <= self.seq_len and (self.max_items is None
                                                  or len(self.rows[r]) < self.max_items):
                self.used[r] += length
                self.rows[r].append(self._count)
                self._count += 1
                return r
        return None

    @property
    def num_items(self) -> int:
        return self._count


def pack_batch(seqs: Sequence[tuple[np.ndarray, np.ndarray]], *, batch_size: int, seq_len: int,
               pad_id: int = 0) -> dict[str, np.ndarray]:
    """Packs sequences first-fit into B rows of length T, each sequence its own segment.

    Args:
      seqs: (tokens, scored) pairs; they must all fit (ValueError otherwise).
      batch_size, seq_len, pad_id: as in pad_batch.
    Returns:
      LM batch [B, T]; segment ids count 1, 2, ... per row in placement order.
    """
    packer = FirstFitPacker(num_rows=batch_size, seq_len=seq_len)
    for i, (tokens, _) in enumerate(seqs):
        if packer.add(len(tokens)) is None:
            raise ValueError(f"sequence {i} ({len(tokens)} tokens) does not fit in "
                             f"{batch_size} rows of {seq_len}")
    batch = _empty((batch_size, seq_len), pad_id)
    for r, items in enumerate(packer.rows):
        offset = 0
        for seg, i in enumerate(items, start=1):
            _place(batch, r, offset, *seqs[i], seg)
            offset += len(seqs[i][0])
    return batch


def pad_pair_batch(examples: Sequence[Example], *, batch_size: int, seq_len: int,
                   pad_id: int = 0) -> dict[str, np.ndarray]:
    """Preference pairs on a pair axis: [:, 0] = prompt + chosen, [:, 1] = prompt + rejected.

    Args:
      examples: Examples with completions (chosen, rejected).
      batch_size, seq_len, pad_id: as in pad_batch.
    Returns:
      Preference batch, each key [B, 2, T]; plus ref_logps float32 [B, 2] when every example
      carries precomputed reference log-probs.
    """
    _check_rows(len(examples), batch_size)
    batch = _empty((batch_size, 2, seq_len), pad_id)
    for i, ex in enumerate(examples):
        for p in range(2):
            _place(batch, (i, p), 0, *sequence(ex.prompt, ex.completions[p]), 1)
    if examples and all(ex.ref_logps is not None for ex in examples):
        batch["ref_logps"] = np.zeros((batch_size, 2), np.float32)
        batch["ref_logps"][:len(examples)] = [ex.ref_logps for ex in examples]
    return batch


def pair_length(example: Example) -> int:
    """Tokens one packed pair takes in a row (prompt twice, chosen, rejected)."""
    return 2 * len(example.prompt) + len(example.completions[0]) + len(example.completions[1])


def pack_pair_batch(examples: Sequence[Example], *, batch_size: int, seq_len: int,
                    max_pairs: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Packs several chosen/rejected pairs per row; both sequences of a pair share the row.

    Args:
      examples: Examples with completions (chosen, rejected); they must all fit.
      batch_size, seq_len, pad_id: as in pad_batch.
      max_pairs: M, the most pairs a row holds.
    Returns:
      LM keys [B, T] plus chosen_segment, rejected_segment int32 [B, M] (segment ids of the m-th
      pair in the row: 2m+1 and 2m+2) and pair_mask float32 [B, M] (0 = empty slot); plus
      ref_logps float32 [B, M, 2] when every example carries precomputed reference log-probs.
    """
    packer = FirstFitPacker(num_rows=batch_size, seq_len=seq_len, max_items_per_row=max_pairs)
    for i, ex in enumerate(examples):
        if packer.add(pair_length(ex)) is None:
            raise ValueError(f"pair {i} ({pair_length(ex)} tokens) does not fit in "
                             f"{batch_size} rows of {seq_len} with at most {max_pairs} pairs a row")
    batch = _empty((batch_size, seq_len), pad_id)
    batch["chosen_segment"] = np.zeros((batch_size, max_pairs), np.int32)
    batch["rejected_segment"] = np.zeros((batch_size, max_pairs), np.int32)
    batch["pair_mask"] = np.zeros((batch_size, max_pairs), np.float32)
    for r, items in enumerate(packer.rows):
        offset = 0
        for m, i in enumerate(items):
            for p, key in enumerate(("chosen_segment", "rejected_segment")):
                tokens, scored = sequence(examples[i].prompt, examples[i].completions[p])
                _place(batch, r, offset, tokens, scored, 2 * m + 1 + p)
                batch[key][r, m] = 2 * m + 1 + p
                offset += len(tokens)
            batch["pair_mask"][r, m] = 1.0
    if examples and all(ex.ref_logps is not None for ex in examples):
        batch["ref_logps"] = np.zeros((batch_size, max_pairs, 2), np.float32)
        for r, items in enumerate(packer.rows):
            for m, i in enumerate(items):
                batch["ref_logps"][r, m] = examples[i].ref_logps
    return batch


def _kl_sequence(prompt, completion, seq_len):
    """The mismatched KL sequence, cut to seq_len: the prompt from the left, then the completion."""
    keep = max(min(len(prompt), seq_len - len(completion)), 1 if len(prompt) else 0)
    prompt = prompt[len(prompt) - keep:]
    return sequence(prompt, completion[:seq_len - len(prompt)])


def kto_batch(examples: Sequence[Example], *, batch_size: int, seq_len: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
    """KTO: one prompt + completion per row, its label, and a mismatched pair for the KL estimate.

    As in the KTO paper, row i's KL sequence is prompt i with the completion of example
    (i + 1) mod n in the batch (n = number of examples), so it is never the example's own answer
    when n > 1.

    Args:
      examples: Examples with one completion and a label.
      batch_size, seq_len, pad_id: as in pad_batch.
    Returns:
      LM keys [B, T], label float32 [B], kl_tokens / kl_targets / kl_loss_mask / kl_positions /
      kl_segment_ids [B, T].
    """
    _check_rows(len(examples), batch_size)
    batch = pad_batch([sequence(ex.prompt, ex.completions[0]) for ex in examples],
                      batch_size=batch_size, seq_len=seq_len, pad_id=pad_id)
    n = len(examples)
    kl = pad_batch([_kl_sequence(ex.prompt, examples[(i + 1) % n].completions[0], seq_len)
                    for i, ex in enumerate(examples)],
                   batch_size=batch_size, seq_len=seq_len, pad_id=pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["label"] = np.zeros((batch_size,), np.float32)
    batch["label"][:n] = [ex.label for ex in examples]
    return batch


def sami_batch(examples: Sequence[SamiExample], *, batch_size: int, seq_len: int,
               pad_id: int = 0) -> dict[str, np.ndarray]:
    """SAMI: for each query, the C x C matrix of (constitution_i + query) then response_j.

    Args:
      examples: SamiExamples, all with the same number of constitutions C.
      batch_size, seq_len, pad_id: as in pad_batch.
    Returns:
      LM keys with shape [B, C, C, T]; loss_mask covers response tokens only.
    """
    _check_rows(len(examples), batch_size)
    num_c = {len(ex.prompts) for ex in examples}
    if len(num_c) != 1:
        raise ValueError(f"SAMI examples differ in their number of constitutions: {sorted(num_c)}")
    (c,) = num_c
    batch = _empty((batch_size, c, c, seq_len), pad_id)
    for b, ex in enumerate(examples):
        for i in range(c):
            for j in range(c):
                _place(batch, (b, i, j), 0, *sequence(ex.prompts[i], ex.responses[j]), 1)
    return batch


def classification_batch(seqs: Sequence[np.ndarray], labels: Sequence[int], *, batch_size: int,
                         seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Classifier inputs (the inspector): one sequence per row and an int label.

    Args:
      seqs: int token arrays, each at most seq_len long.
      labels: one int per sequence.
      batch_size, seq_len, pad_id: as in pad_batch.
    Returns:
      {"tokens", "segment_ids", "positions": [B, T], "labels": int32 [B]}.
    """
    _check_rows(len(seqs), batch_size)
    full = pad_batch([(np.asarray(s, np.int32), np.zeros(len(s), np.float32)) for s in seqs],
                     batch_size=batch_size, seq_len=seq_len, pad_id=pad_id)
    out = {k: full[k] for k in ("tokens", "segment_ids", "positions")}
    out["labels"] = np.zeros((batch_size,), np.int32)
    out["labels"][:len(labels)] = labels
    return out
