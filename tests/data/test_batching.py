"""Batches contract: shifted targets, loss masks on target positions, positions, segment ids,
first-fit packing and the packed preference layout, checked against numpy written here."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align_jax.data import batching
from align_jax.data.formatting import Example, SamiExample

KEYS = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
        "positions": np.int32, "segment_ids": np.int32}


def _arr(x):
    return np.asarray(x, np.int32)


def _segments(row_segment_ids):
    """{segment id: (start, end)}, asserting each segment is one contiguous run."""
    out = {}
    for s in np.unique(row_segment_ids[row_segment_ids > 0]):
        idx = np.flatnonzero(row_segment_ids == s)
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment split"
        out[int(s)] = (idx[0], idx[-1] + 1)
    return out


def _check_row(row, expected_seqs):
    """row: dict of 1-D arrays; expected_seqs: {segment: (tokens, scored)}."""
    segs = _segments(row["segment_ids"])
    assert set(segs) == set(expected_seqs)
    covered = np.zeros(len(row["tokens"]), bool)
    for s, (start, end) in segs.items():
        tokens, scored = expected_seqs[s]
        assert np.array_equal(row["tokens"][start:end], tokens)
        assert np.array_equal(row["positions"][start:end], np.arange(end - start))
        assert np.array_equal(row["targets"][start:end - 1], tokens[1:])
        assert np.array_equal(row["loss_mask"][start:end - 1], scored[1:])
        assert row["loss_mask"][end - 1] == 0  # nothing is predicted across a segment boundary
        covered[start:end] = True
    assert not row["loss_mask"][~covered].any() and not row["segment_ids"][~covered].any()


def test_pad_batch_hand_built():
    seqs = [batching.sequence([5, 6], [7, 8, 2]), batching.sequence([], [9, 2])]
    batch = batching.pad_batch(seqs, batch_size=3, seq_len=6, pad_id=0)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((3, 6), np.dtype(d)) for k, d in KEYS.items()}
    np.testing.assert_array_equal(batch["tokens"][0], [5, 6, 7, 8, 2, 0])
    np.testing.assert_array_equal(batch["targets"][0], [6, 7, 8, 2, 0, 0])
    # The target of position 1 is the first completion token (7): scored from there on.
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 4, 0])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch["loss_mask"][1], [1, 0, 0, 0, 0, 0])
    assert not batch["segment_ids"][2].any() and not batch["loss_mask"][2].any()


def test_pack_batch_first_fit_hand_built():
    lens = [6, 5, 3, 2, 4]
    seqs = [batching.sequence(_arr([i] * 2), _arr(range(10 * i, 10 * i + n - 2)))
            for i, n in enumerate(lens)]
    # First-fit: 6 -> row 0; 5 -> row 1; 3 -> row 0 (9 used); 2 -> row 1 (7 used); 4 fits nowhere.
    with pytest.raises(ValueError, match="sequence 4"):
        batching.pack_batch(seqs, batch_size=2, seq_len=10)
    batch = batching.pack_batch(seqs[:4], batch_size=2, seq_len=10)
    _check_row({k: v[0] for k, v in batch.items()}, {1: seqs[0], 2: seqs[2]})
    _check_row({k: v[1] for k, v in batch.items()}, {1: seqs[1], 2: seqs[3]})
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=20), st.integers(0, 2**31 - 1))
def test_packing_invariants(lengths, seed):
    rng = np.random.default_rng(seed)
    seqs = [(_arr(rng.integers(3, 50, n)), (rng.random(n) < 0.6).astype(np.float32))
            for n in lengths]
    packer = batching.FirstFitPacker(num_rows=4, seq_len=12)
    fitted = []
    for s in seqs:
        if packer.add(len(s[0])) is None:
            break
        fitted.append(s)
    batch = batching.pack_batch(fitted, batch_size=4, seq_len=12)
    assert batch["segment_ids"].astype(bool).sum() == sum(len(t) for t, _ in fitted)
    found = []
    for r in range(4):
        row = {k: v[r] for k, v in batch.items()}
        for start, end in _segments(row["segment_ids"]).values():
            found.append(row["tokens"][start:end].tolist())
            np.testing.assert_array_equal(row["positions"][start:end], np.arange(end - start))
    assert sorted(found) == sorted(t.tolist() for t, _ in fitted)


def _pair(p, c, r, base):
    return Example(prompt=_arr(range(base, base + p)),
                   completions=(_arr(range(base + 50, base + 50 + c)),
                                _arr(range(base + 80, base + 80 + r))))


def test_pad_pair_batch():
    exs = [_pair(3, 2, 4, 100), _pair(1, 5, 1, 200)]
    batch = batching.pad_pair_batch(exs, batch_size=2, seq_len=8)
    assert all(v.shape == (2, 2, 8) for v in batch.values())
    for b, ex in enumerate(exs):
        for p in range(2):
            row = {k: v[b, p] for k, v in batch.items()}
            _check_row(row, {1: batching.sequence(ex.prompt, ex.completions[p])})
    np.testing.assert_array_equal(batch["tokens"][0, :, :3], [[100, 101, 102]] * 2)


def test_pack_pair_batch_layout():
    exs = [_pair(2, 2, 3, 100), _pair(1, 1, 1, 200), _pair(3, 3, 3, 300)]  # 9, 4, 12 tokens
    batch = batching.pack_pair_batch(exs, batch_size=2, seq_len=14, max_pairs=2)
    # first-fit: pair 0 -> row 0 (9), pair 1 -> row 0 (13), pair 2 -> row 1 (12).
    np.testing.assert_array_equal(batch["chosen_segment"], [[1, 3], [1, 0]])
    np.testing.assert_array_equal(batch["rejected_segment"], [[2, 4], [2, 0]])
    np.testing.assert_array_equal(batch["pair_mask"], [[1, 1], [1, 0]])
    def seq(ex, p):
        return batching.sequence(ex.prompt, ex.completions[p])
    _check_row({k: batch[k][0] for k in KEYS},
               {1: seq(exs[0], 0), 2: seq(exs[0], 1), 3: seq(exs[1], 0), 4: seq(exs[1], 1)})
    _check_row({k: batch[k][1] for k in KEYS}, {1: seq(exs[2], 0), 2: seq(exs[2], 1)})
    # max_pairs caps a row even when tokens would fit.
    batch = batching.pack_pair_batch(exs[1:2] * 3, batch_size=2, seq_len=14, max_pairs=2)
    np.testing.assert_array_equal(batch["pair_mask"], [[1, 1], [1, 0]])


def test_kto_batch_kl_pairs_are_mismatched():
    exs = [Example(prompt=_arr([10 + i] * 2), completions=(_arr([20 + i] * 3),), label=float(i % 2))
           for i in range(3)]
    batch = batching.kto_batch(exs, batch_size=4, seq_len=6)
    np.testing.assert_array_equal(batch["label"], [0, 1, 0, 0])
    for i in range(3):
        j = (i + 1) % 3
        _check_row({k: batch[k][i] for k in KEYS},
                   {1: batching.sequence(exs[i].prompt, exs[i].completions[0])})
        _check_row({k: batch["kl_" + k][i] for k in KEYS},
                   {1: batching.sequence(exs[i].prompt, exs[j].completions[0])})


def test_sami_batch_matrix():
    ex = SamiExample(prompts=(_arr([1, 11]), _arr([1, 12, 12])),
                     responses=(_arr([21, 2]), _arr([22, 22, 22, 2])))
    batch = batching.sami_batch([ex], batch_size=1, seq_len=8)
    assert all(v.shape == (1, 2, 2, 8) for v in batch.values())
    for i in range(2):
        for j in range(2):
            _check_row({k: batch[k][0, i, j] for k in KEYS},
                       {1: batching.sequence(ex.prompts[i], ex.responses[j])})
            assert batch["loss_mask"][0, i, j].sum() == len(ex.responses[j])


def test_classification_batch():
    batch = batching.classification_batch([[1, 5, 6], [1, 7]], [0, 1], batch_size=3, seq_len=4)
    np.testing.assert_array_equal(batch["tokens"], [[1, 5, 6, 0], [1, 7, 0, 0], [0] * 4])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0], [1, 1, 0, 0], [0] * 4])
    np.testing.assert_array_equal(batch["labels"], [0, 1, 0])
