"""Inspector training on a separable synthetic set; its metrics against independent counting."""

import json
import os

import numpy as np
import pytest
import transformers

from align_jax.methods import inspectors


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    questions = ["how do i fix my bike", "is the shop open on sunday",
                 "can you help me with a repair please", "how do i check my brakes"]
    good = ["sure here is what to do first check tyre chain brakes", "thank you sure",
            "sure please check the chain first"]
    bad = ["you idiot go away", "nobody cares stupid question", "go away nobody cares"]
    rows = []
    for i in range(n):
        q = f"{questions[i % len(questions)]} {i}"
        rows.append({"input": q, "response": good[rng.integers(len(good))], "label": 1,
                     "criterion": "ethical"})
        rows.append({"input": q, "response": bad[rng.integers(len(bad))], "label": 0,
                     "criterion": "ethical"})
    return rows


def test_roc_auc_and_calibration_against_pair_counting():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50), 1)  # ties on purpose
    pos, neg = scores[labels == 1], scores[labels == 0]
    expected = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert inspectors.roc_auc(labels, scores) == pytest.approx(expected)
    ece, bins = inspectors.calibration([1, 0, 1, 1], [0.95, 0.05, 0.55, 0.65], num_bins=2)
    # bin [0, .5): score .05, label 0 -> |.05 - 0|; bin [.5, 1]: mean .7167, all aligned.
    assert ece == pytest.approx(0.25 * 0.05 + 0.75 * (1 - (0.95 + 0.55 + 0.65) / 3))
    assert [b["count"] for b in bins] == [1, 3]


def test_inspector_learns_a_separable_set(tmp_path):
    records = synthetic_records(24)
    enc = inspectors.build_tiny_encoder([r["input"] + " " + r["response"] for r in records],
                                        str(tmp_path / "enc"), max_length=64)
    out = str(tmp_path / "inspector")
    metrics = inspectors.train_inspector(records, encoder_dir=enc, output_dir=out,
                                         criterion="ethical", num_epochs=6, learning_rate=2e-3,
                                         batch_size=8, max_length=32)
    assert metrics["heldout_rows"] == 10 and metrics["train_rows"] == 38
    assert metrics["accuracy"] >= 0.9, metrics
    assert metrics["roc_auc"] >= 0.95
    assert os.path.isfile(os.path.join(out, "reliability.png"))
    assert json.load(open(os.path.join(out, "metrics.json")))["accuracy"] == metrics["accuracy"]
    # Saved as a BertForSequenceClassification that transformers reads, scoring the same.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    inspect = inspectors.make_inspector(out)
    x, y = ["how do i fix my bike 1"], ["you idiot go away"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    import torch
    with torch.no_grad():
        ref = torch.softmax(model(**hf_tok(x, y, return_tensors="pt")).logits, -1)[:, 1].numpy()
    np.testing.assert_allclose(inspect(x, y), ref, atol=1e-5)
    assert inspect(x, y)[0] < 0.5 < inspect(x, ["thank you sure"])[0]
