"""Objective records: a new objective is one record; bad loss keywords fail at the start."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.data import batching, formats
from align_jax.losses import objectives
from align_jax.models import transformer
from align_jax.train import entry

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = f"train:{ROOT / 'examples' / 'values_document.md'}"


def _weighted_batch(examples, *, batch_size, seq_len, pad_id):
    """A padded SFT batch plus `row_weight`: 2.0 for the first row, 1.0 for the others."""
    batch = batching.pad_batch([batching.sequence(x.prompt, x.completions[0]) for x in examples],
                               batch_size=batch_size, seq_len=seq_len, pad_id=pad_id)
    batch["row_weight"] = np.ones((batch_size,), np.float32)
    batch["row_weight"][0] = 2.0
    return batch


def _weighted_nll(params, batch, *, config, rng, ref_params, scale=1.0):
    """scale * weighted mean token NLL, written independently of align_jax.losses."""
    del rng, ref_params
    logits_BTV = transformer.forward(config, params, batch["tokens"],
                                     positions_BT=batch["positions"],
                                     segment_ids_BT=batch["segment_ids"])
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    w_BT = batch["loss_mask"] * batch["row_weight"][:, None]
    loss = scale * jnp.sum(nll_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)
    return loss, {"loss": loss, "weight": jnp.sum(w_BT)}


WEIGHTED = objectives.Objective(
    name="test_weighted_sft", loss=_weighted_nll, options=("scale",),
    data=formats.DataFormat(
        name="test_weighted_sft", kind="sft", build=_weighted_batch,
        # Its own schema: string prompt and completion only (no `messages` form).
        schema=({"prompt": "text", "completion": "text"},)))


def _run(tmp_path, objective, data, *, run="run", **kw):
    return entry.train_main(
        output_dir=str(tmp_path / run), data=str(data), objective=objective, model="tiny",
        tokenizer=TOKENIZER, seq_len=32, batch_size=8, pack=False, num_steps=2, log_every=1,
        export_hf=False, progress=False, mesh=None, rules="dp", **kw)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_new_objective_is_one_record_and_trains(tmp_path):
    objectives.register_objective(WEIGHTED)
    objectives.register_objective(WEIGHTED)  # the same record again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        objectives.register_objective(objectives.Objective(name="sft", loss=_weighted_nll))
    data = _write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"answer {i}"}
                                         for i in range(8)])
    summary = _run(tmp_path, "test_weighted_sft", data, loss_kwargs={"scale": 3.0})
    assert summary["objective"] == "test_weighted_sft" and summary["num_steps"] == 2
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    # `weight` is only in this objective's metrics: the step ran its loss on its batches.
    assert all(m["weight"] > 0 for m in metrics) and all(np.isfinite(m["loss"]) for m in metrics)
    # Its own schema is what the records are checked against (messages are not accepted).
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                        {"role": "assistant", "content": "y"}]}])
    with pytest.raises(ValueError, match="bad.jsonl:1: missing field 'prompt'"):
        _run(tmp_path, "test_weighted_sft", bad, run="bad_run")


def test_a_wrong_loss_keyword_fails_before_the_data_is_read(tmp_path):
    missing = tmp_path / "does_not_exist.jsonl"
    with pytest.raises(ValueError, match="objective 'dpo': unknown loss keyword 'betta'"):
        _run(tmp_path, "dpo", missing, loss_kwargs={"betta": 0.1})
    with pytest.raises(ValueError, match="objective 'sft'.*'rng' is passed by the train step"):
        _run(tmp_path, "sft", missing, loss_kwargs={"rng": 0})
    with pytest.raises(ValueError, match="train_main.objective='nope'"):
        _run(tmp_path, "nope", missing)
    assert not os.path.exists(tmp_path / "run")


def test_reference_policy_of_the_built_in_objectives():
    dpo, kto, sft = (objectives.get_objective(n) for n in ("dpo", "kto", "sft"))
    assert dpo.reference_mode("precomputed", {}) == "precomputed"
    assert dpo.reference_mode("params", {}) == "params"
    assert dpo.reference_mode("precomputed", {"reference_free": True}) == "none"
    assert dpo.reference_mode("params", {"loss_type": "simpo"}) == "none"
    assert kto.reference_mode("precomputed", {}) == "params"
    assert sft.reference_mode("precomputed", {}) == "none"
    with pytest.raises(ValueError, match="reference='frozen'"):
        sft.reference_mode("frozen", {})
    with pytest.raises(ValueError, match="precompute_reference"):
        objectives.Objective(name="x", loss=_weighted_nll, references=("precomputed",))
    # Every registered objective names a data format the loaders know.
    for obj in objectives.OBJECTIVES.values():
        assert obj.data_format.name in formats.FORMATS or obj.name.startswith("test_")
