"""The SAMI paper's query sets from fixture files written in the published Hugging Face
layouts (no network): HH-RLHF's first human turns and TL;DR's unique posts."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_jax.data import DataError
from align_jax.data.paper_datasets import (
    first_human_turn,
    hh_rlhf_first_turns,
    tldr_posts,
    write_queries,
)
from align_jax.data.sources import load_records
from align_jax.methods import sami_prompts


def _dialogue(turns):
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


@pytest.fixture(scope="module")
def hh_dir(tmp_path_factory):
    """Anthropic/hh-rlhf's layout: <subset>/{train,test}.jsonl.gz of {"chosen", "rejected"}."""
    root = tmp_path_factory.mktemp("hh-rlhf")
    for subset, topic in (("helpful-base", "dogs"), ("harmless-base", "locks")):
        for split, n in (("train", 3), ("test", 4)):
            rows = []
            for i in range(n):
                first = f"{split} question {i} about {topic}?"
                chosen = _dialogue([("Human", first), ("Assistant", "Sure: here is how."),
                                    ("Human", "And then what?"), ("Assistant", "Then stop.")])
                rejected = _dialogue([("Human", first), ("Assistant", "No.")])
                rows.append({"chosen": chosen, "rejected": rejected})
            (root / subset).mkdir(exist_ok=True)
            with gzip.open(root / subset / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(root)


def test_hh_rlhf_first_turns_per_subset_in_order(hh_dir):
    got = hh_rlhf_first_turns(hh_dir)
    assert [r["prompt"] for r in got] == (
        [f"test question {i} about dogs?" for i in range(4)]
        + [f"test question {i} about locks?" for i in range(4)])
    assert [r["subset"] for r in got] == ["helpful-base"] * 4 + ["harmless-base"] * 4
    assert [r["index"] for r in got[:4]] == [0, 1, 2, 3]
    train = hh_rlhf_first_turns(hh_dir, subsets="harmless-base", split="train", limit=2)
    assert [r["prompt"] for r in train] == ["train question 0 about locks?",
                                            "train question 1 about locks?"]
    # Later turns and the labels are dropped.
    assert all("And then what" not in r["prompt"] and "Sure" not in r["prompt"] for r in got)


def test_hh_turn_parsing_and_errors(hh_dir, tmp_path):
    assert first_human_turn("\n\nHuman: Hi there\n\nAssistant: Hello") == "Hi there"
    assert first_human_turn("Human: only a question") == "only a question"
    assert first_human_turn("\n\nHuman: a\nb\n\nAssistant: c\n\nHuman: d") == "a\nb"
    with pytest.raises(DataError, match="no 'Human:' turn"):
        first_human_turn("Assistant: hi", where="x")
    with pytest.raises(DataError, match="cannot read split 'validation'"):
        hh_rlhf_first_turns(hh_dir, subsets="helpful-base", split="validation")
    bad = tmp_path / "bad" / "helpful-base"
    bad.mkdir(parents=True)
    with gzip.open(bad / "test.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(DataError, match="no field 'chosen'"):
        hh_rlhf_first_turns(str(tmp_path / "bad"), subsets="helpful-base")


POSTS = {"t1": "My landlord keeps the deposit. What now?", "t2": "I cannot sleep before exams.",
         "t3": "Should I tell my friend the truth?"}


@pytest.fixture(scope="module")
def tldr_dir(tmp_path_factory):
    """openai/summarize_from_feedback's parquet export: comparisons/<split>/0000.parquet, rows
    {info: {id, post, title, subreddit, site, article}, summaries: [{text, policy, note}] x 2,
    choice, worker, batch, split, extra: {confidence}}; several rows per post."""
    root = tmp_path_factory.mktemp("summarize_from_feedback")
    order = {"train": ["t1", "t1", "t2", "t1", "t3", "t2"], "validation": ["t3", "t3"]}
    for split, ids in order.items():
        rows = [{"info": {"id": i, "post": " " + POSTS[i] + "\n", "title": f"title {i}",
                          "subreddit": "r/advice", "site": None, "article": None},
                 "summaries": [{"text": f"summary {k}", "policy": "sup", "note": None}
                               for k in range(2)],
                 "choice": k % 2, "worker": "w", "batch": "b1", "split": split,
                 "extra": {"confidence": 5}} for k, i in enumerate(ids)]
        (root / "comparisons" / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / "comparisons" / split / "0000.parquet")
    return str(root)


def test_tldr_unique_posts_in_first_seen_order(tldr_dir, tmp_path):
    got = tldr_posts(tldr_dir)
    assert [r["id"] for r in got] == ["t1", "t2", "t3"]
    assert [r["prompt"] for r in got] == [POSTS["t1"], POSTS["t2"], POSTS["t3"]]
    assert got[0]["title"] == "title t1" and got[0]["subreddit"] == "r/advice"
    assert [r["id"] for r in tldr_posts(tldr_dir, limit=2)] == ["t1", "t2"]
    assert [r["id"] for r in tldr_posts(tldr_dir, split="validation")] == ["t3"]
    # As SAMI queries, in the paper's summarization layout.
    path = write_queries(got, str(tmp_path / "q" / "tldr.jsonl"))
    records, _ = load_records(path, schema="query")
    assert [r.data["prompt"] for r in records] == [POSTS[i] for i in ("t1", "t2", "t3")]
    prompt = sami_prompts.sami_prompt(["Be brief."], records[0].data["prompt"], fmt="summary",
                                      rng=None)
    assert f"Post: {POSTS['t1']}\n\nSummary:" in prompt
    other = tmp_path / "other" / "comparisons" / "train"
    other.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"post": "x"}]), other / "0000.parquet")
    with pytest.raises(DataError, match="no field 'info'"):
        tldr_posts(str(tmp_path / "other"))
