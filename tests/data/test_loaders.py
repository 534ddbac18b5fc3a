"""grain loaders: deterministic order per seed, exact resume, epoch coverage, sharding, reports."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from data_char_tokenizer import CharTokenizer

from align_jax.data import make_loader
from align_jax.data.sources import DataError

TOK = CharTokenizer()
SFT = [{"prompt": f"q{i}", "completion": "a" * (1 + i % 7) + str(i)} for i in range(23)]
PREF = [{"prompt": f"q{i}", "chosen": "y" * (1 + i % 5), "rejected": "n" * (1 + i % 3) + str(i)}
        for i in range(17)]


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


CASES = {
    "sft_padded": {"records_or_spec": SFT, "kind": "sft", "seq_len": 16, "batch_size": 4},
    "sft_packed": {"records_or_spec": SFT, "kind": "sft", "seq_len": 24, "batch_size": 2,
                   "pack": True},
    "pref_padded": {"records_or_spec": PREF, "kind": "preference", "seq_len": 16, "batch_size": 3},
    "pref_packed": {"records_or_spec": PREF, "kind": "preference", "seq_len": 40, "batch_size": 2,
                        "pack": True},
    "sft_packed_prefetch": {"records_or_spec": SFT, "kind": "sft", "seq_len": 24,
                            "batch_size": 2, "pack": True, "prefetch": 3},
    "kto": {"records_or_spec": [{**r, "label": i % 2 == 0} for i, r in enumerate(SFT)],
                "kind": "kto", "seq_len": 16, "batch_size": 4},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_same_order_and_resume_equals_uninterrupted(case):
    kw = dict(CASES[case], tokenizer=TOK, seed=7, num_epochs=3, shard=(0, 1))
    full = list(make_loader(**kw))
    assert _equal(full, list(make_loader(**kw)))
    assert not _equal(full, list(make_loader(**{**kw, "seed": 8})))
    for k in (1, 5, len(full) // 2 + 1):  # includes stops across an epoch boundary
        first = make_loader(**kw)
        head = _take(first, k)
        state = json.loads(json.dumps(first.get_state()))  # what a checkpoint would hold
        resumed = make_loader(**kw)
        resumed.set_state(state)
        assert _equal(head + list(resumed), full), f"resume after {k} batches differs"


def _completion_text(tokens, loss_mask, segment_ids):
    """Scored target tokens per segment of one row, as tuples (identifies the example)."""
    out = []
    for s in np.unique(segment_ids[segment_ids > 0]):
        idx = segment_ids == s
        out.append(tuple(tokens[np.roll(idx, 1) & (np.roll(loss_mask, 1) > 0)].tolist()))
    return out


def test_each_epoch_covers_every_example_once():
    kw = {"kind": "sft", "tokenizer": TOK, "seq_len": 24, "batch_size": 2, "pack": True, "seed": 3,
              "num_epochs": 2, "shard": (0, 1)}
    batches = list(make_loader(SFT, **kw))
    seen = []
    for b in batches:
        for r in range(2):
            seen += _completion_text(b["tokens"][r], b["loss_mask"][r], b["segment_ids"][r])
    unshuffled = list(make_loader(SFT, **{**kw, "shuffle": False, "num_epochs": 1}))
    once = []
    for b in unshuffled:
        for r in range(2):
            once += _completion_text(b["tokens"][r], b["loss_mask"][r], b["segment_ids"][r])
    assert len(once) == len(SFT) and len(set(once)) == len(SFT)
    assert sorted(seen) == sorted(once * 2)
    assert seen[:len(SFT)] != once  # shuffled
    assert seen[:len(SFT)] != seen[len(SFT):]  # reshuffled each epoch


def test_padded_remainder_and_row_mask_rule():
    kw = {"kind": "sft", "tokenizer": TOK, "seq_len": 16, "seed": 1}
    assert len(list(make_loader(SFT, batch_size=4, shard=(0, 1), **kw))) == 23 // 4
    tail = list(make_loader(SFT, batch_size=4, shard=(0, 1), drop_remainder=False, **kw))
    assert len(tail) == 6 and (tail[-1]["segment_ids"].any(axis=1) == [1, 1, 1, 0]).all()
    with pytest.raises(ValueError, match="drop_remainder"):
        make_loader(PREF, kind="preference", tokenizer=TOK, seq_len=16, batch_size=4,
                    drop_remainder=False, shard=(0, 1))


@pytest.mark.parametrize("case", ["sft_padded", "sft_packed", "pref_packed", "kto"])
def test_process_shards_assemble_the_single_process_batch(case):
    kw = {**CASES[case], "tokenizer": TOK, "seed": 5, "num_epochs": 2}
    kw["batch_size"] *= 2
    single = list(make_loader(**kw, shard=(0, 1)))
    shards = [list(make_loader(**kw, shard=(i, 2))) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single)
    for whole, a, b in zip(single, *shards):
        assert a["tokens"].shape[0] == whole["tokens"].shape[0] // 2
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k])


def test_bad_input_and_truncation_are_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in PREF[:5]]
    lines[1] = "{oops"
    lines[3] = json.dumps({"prompt": "q", "rejected": "r"})
    lines.append(json.dumps({"prompt": "p" * 50, "chosen": "c" * 30, "rejected": "r"}))
    path.write_text("\n".join(lines) + "\n")
    kw = {"kind": "preference", "tokenizer": TOK, "seq_len": 24, "batch_size": 1, "shard": (0, 1)}
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
        make_loader(str(path), **kw)
    loader = make_loader(str(path), on_error="skip", truncation="drop", **kw)
    assert [s.where for s in loader.load_report.skipped] == [f"{path}:2", f"{path}:4"]
    assert [t.where for t in loader.truncation_report.dropped] == [f"{path}:6"]
    assert len(list(loader)) == 3
    loader = make_loader(str(path), on_error="skip", truncation="truncate_prompt_left", **kw)
    assert [t.where for t in loader.truncation_report.dropped] == [f"{path}:6"]  # answer too long
    loader = make_loader(str(path), on_error="skip", truncation="truncate_completion", **kw)
    assert "prompt alone needs" in loader.truncation_report.dropped[0].reason
    assert loader.truncation_report.cut == [] and loader.num_examples == 3
    with pytest.raises(DataError, match=f"{path}:6: example needs"):
        make_loader(str(path), on_error="skip", truncation="error", **kw)


def test_only_lost_records_log_a_warning(tmp_path, caplog):
    """Prompts cut by the truncation policy asked for are INFO; skipped or dropped ones WARNING."""
    path = tmp_path / "d.jsonl"
    cut = {"prompt": "p" * 30, "completion": "c"}
    path.write_text(json.dumps(SFT[0]) + "\n" + json.dumps(cut) + "\n")
    kw = {"kind": "sft", "tokenizer": TOK, "seq_len": 16, "batch_size": 1, "shard": (0, 1)}
    with caplog.at_level("INFO", logger="align_jax.data.loaders"):
        loader = make_loader(str(path), **kw)
    assert len(loader.truncation_report.cut) == 1
    assert [r.levelname for r in caplog.records] == ["INFO"]
    caplog.clear()
    path.write_text(json.dumps(SFT[0]) + "\n{oops\n")
    with caplog.at_level("INFO", logger="align_jax.data.loaders"):
        make_loader(str(path), on_error="skip", **kw)
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_sami_loader_shapes():
    recs = [{"prompt": f"q{i}", "constitutions": ["be kind", "be rude"],
             "responses": ["sure" * (i + 1), "no"]} for i in range(4)]
    loader = make_loader(recs, kind="sami", tokenizer=TOK, seq_len=40, batch_size=2, seed=0,
                         shard=(0, 1))
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["tokens"].shape == (2, 2, 2, 40)
    scored = batches[0]["loss_mask"].sum(-1)  # [B, C, C]: response j scores the same in every row
    assert (scored[:, 0, :] == scored[:, 1, :]).all()


def test_packed_sft_from_hf_json_with_the_real_tokenizer(tmp_path):
    tokenizer = pytest.importorskip("align_jax.tokenizer_training")
    records = [{"prompt": f"question {i}?", "completion": "answer " * (1 + i % 4) + str(i)}
               for i in range(9)]
    tok = tokenizer.train_tokenizer([r["prompt"] + " " + r["completion"] for r in records] * 5,
                                    tmp_path / "tok", vocab_size=300)
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loader = make_loader(f"hf:{path}", kind="sft", tokenizer=tok, seq_len=64, batch_size=2,
                         pack=True, seed=0, shard=(0, 1))
    answers = []
    for batch in loader:
        for r in range(2):
            seg, mask = batch["segment_ids"][r], batch["loss_mask"][r]
            for s in np.unique(seg[seg > 0]):
                scored = batch["targets"][r][(seg == s) & (mask > 0)]
                assert scored[-1] == tok.eos_id
                answers.append(tok.decode(scored.tolist()))
    assert sorted(answers) == sorted(r["completion"] for r in records)


def test_process_exits_cleanly_with_an_unfinished_prefetching_loader():
    # grain's prefetch thread, left running at interpreter exit, aborts the process (rc 134).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from align_jax.data import make_loader\n"
        "from data_char_tokenizer import CharTokenizer\n"
        "recs = [{'prompt': 'q', 'completion': 'a' * i} for i in range(1, 30)]\n"
        "loader = make_loader(recs, kind='sft', tokenizer=CharTokenizer(), seq_len=16,\n"
        "                     batch_size=2, pack=True, prefetch=4, shard=(0, 1))\n"
        "next(loader)\n")
    done = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr
