"""Evaluation during training: the eval step is the step's loss without gradients, the best
evaluation is tracked (and kept, and exported), early stopping, resume keeps the tracking."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import CountingIterator, make_batch, tiny_config

from align_jax import sharding
from align_jax.losses import objectives
from align_jax.models import transformer
from align_jax.models.hf import load_hf
from align_jax.train import Checkpointer, OptimizerConfig, load_params, train
from align_jax.train.evaluation import BestTracker, EvalConfig, Evaluator, combine


def token_nll(params, batch, *, config, rng=None, ref_params=None):
    """Mean next-token NLL over the loss mask, reporting its token count (written here)."""
    del rng, ref_params
    logits_BTV = transformer.forward(config, params, batch["tokens"],
                                     positions_BT=batch["positions"],
                                     segment_ids_BT=batch["segment_ids"])
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BT = batch["loss_mask"]
    n = jnp.sum(mask_BT)
    return jnp.sum(nll_BT * mask_BT) / jnp.maximum(n, 1.0), {"num_tokens": n}


def _eval_batches(n=3):
    return [make_batch(100 + i, seed=1) for i in range(n)]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _evals(workdir):
    return {r["step"]: r for r in _records(workdir) if "eval/loss" in r}


_RUN = dict(mesh_spec=sharding.MeshSpec(data=8), rules="dp", log_every=1, progress=False)


# --- the records, without a model ---------------------------------------------------------

def test_tracker_ties_do_not_improve_and_patience_counts_evaluations():
    t = BestTracker(maximize=False)
    assert [t.update(s, v) for s, v in [(2, 3.0), (4, 2.0), (6, 2.0), (8, float("nan"))]] \
        == [True, True, False, False]
    assert (t.best_step, t.best_value, t.since_best) == (4, 2.0, 2)
    ev = Evaluator(EvalConfig(data="x", metric="accuracy", early_stopping_patience=2), [{}])
    assert ev.config.maximize  # accuracy: larger is better
    for step, acc in [(1, 0.5), (2, 0.75), (3, 0.75)]:
        ev.record(step, {"accuracy": acc, "loss": 1.0})
        assert ev.stop_reason is None
    ev.record(4, {"accuracy": 0.7})
    assert "did not improve for 2 evaluations (best 0.75 at step 2)" in ev.stop_reason
    # The state round-trips, stop included (a run resumed after stopping stops at once).
    again = Evaluator(ev.config, [{}])
    again.set_state(json.loads(json.dumps(ev.get_state())))
    assert again.tracker == ev.tracker and again.stop_reason == ev.stop_reason
    with pytest.raises(ValueError, match="EvalConfig.metric='acc'.*reports"):
        Evaluator(EvalConfig(data="x", metric="acc"), [{}]).record(1, {"accuracy": 1.0})


def test_eval_config_is_checked_by_field():
    assert not EvalConfig(metric="eval_nll").maximize
    assert EvalConfig(metric="margin").maximize
    assert not EvalConfig(metric="margin", greater_is_better=False).maximize
    with pytest.raises(ValueError, match="EvalConfig.every=-1"):
        EvalConfig(data="x", every=-1)
    with pytest.raises(ValueError, match="EvalConfig.batch_size=0"):
        EvalConfig(data="x", batch_size=0)
    with pytest.raises(ValueError, match="need EvalConfig.data"):
        EvalConfig(keep_best=True)


def test_combine_weighs_batches_by_their_scored_units():
    # Two batches of 1 and 3 pairs: accuracies 1 and 0 make 1/4 over the pairs, counts add.
    got = combine([{"accuracy": 1.0, "num_pairs": 1.0}, {"accuracy": 0.0, "num_pairs": 3.0}])
    assert got == {"accuracy": 0.25, "num_pairs": 4.0}
    assert combine([{"x": 1.0}, {"x": 2.0}]) == {"x": 1.5}  # no count: batches weigh equally
    # Perplexities e^1 over 1 token and e^3 over 3: the set's mean NLL is 2.5.
    got = combine([{"perplexity": math.e, "num_tokens": 1.0},
                   {"perplexity": math.e ** 3, "num_tokens": 3.0}])
    assert got["perplexity"] == pytest.approx(math.exp(2.5), rel=1e-12)  # float64 log/exp


def test_eval_records_reach_the_jsonl_and_an_external_writer(tmp_path, monkeypatch, capsys):
    import sys
    import types

    from align_jax.train.metrics import ExternalLogging, MetricsLogger
    calls = []
    run = types.SimpleNamespace(log=lambda values, *, step: calls.append((step, dict(values))),
                                finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    logger = MetricsLogger(tmp_path, num_steps=4, progress=False, tensorboard=False,
                           external=ExternalLogging(names=("wandb",)))
    logger.record_eval(2, {"loss": 1.5, "num_tokens": 10.0}, note="best so far")
    logger.close()
    assert calls == [(2, {"eval/loss": 1.5, "eval/num_tokens": 10.0})]
    (record,) = _records(tmp_path)
    assert record["step"] == 2 and record["eval/loss"] == 1.5
    assert "eval step 2: loss=1.5, num_tokens=10 (best so far)" in capsys.readouterr().out


# --- the loop -----------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [None, {"rank": 4, "alpha": 8.0, "dropout": 0.5}],
                         ids=["full", "lora"])
def test_eval_at_step_0_equals_the_loss_computed_directly(tmp_path, lora):
    # LoRA's adapters start at zero (B = 0): its step-0 model is the base, dropout or not.
    config = tiny_config()
    params = transformer.init_params(config, jax.random.key(3))
    batches = _eval_batches()
    ev = Evaluator(EvalConfig(data="unit", every=1), batches)
    # Host copies: the run donates what it is given.
    train(config=config, params_init=jax.device_get(params), loss_fn=token_nll,
          data_iterator=CountingIterator(),
          optimizer=OptimizerConfig(learning_rate=1e-3), num_steps=1, workdir=tmp_path / "run",
          evaluation=ev, lora=lora, **_RUN)
    evals = _evals(tmp_path / "run")
    assert sorted(evals) == [0, 1]
    # All eval batches as one batch: the token-weighted mean over the whole eval set.
    whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    want, m = token_nll(params, whole, config=config)
    # float32 logits; the loop sums per batch then combines in float64: a few ulps of ~6.
    assert evals[0]["eval/loss"] == pytest.approx(float(want), rel=2e-6)
    assert evals[0]["eval/num_tokens"] == float(m["num_tokens"])
    # One update later the eval loss has moved (the eval sees the new params).
    assert evals[1]["eval/loss"] != evals[0]["eval/loss"]


@pytest.mark.slow  # a tokenizer, then the DPO step and eval step compiled: about 25 s
def test_dpo_eval_at_step_0_with_the_reference_equal_to_the_policy(tmp_path):
    from align_jax.data import make_loader
    from align_jax.tokenizer import load_tokenizer
    from align_jax.train.entry import build_tokenizer
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tok = load_tokenizer(build_tokenizer(os.path.join(root, "examples", "values_document.md"),
                                         str(tmp_path / "tok")))
    config = tiny_config(vocab_size=tok.vocab_size)

    def loader(path, **kw):
        return make_loader(os.path.join(root, "examples", path), kind="preference", tokenizer=tok,
                           seq_len=128, batch_size=8, pack=True, **kw)

    held = loader("preference_heldout.jsonl", num_epochs=1, shuffle=False)
    ev = Evaluator(EvalConfig(data="held", every=0), list(held))
    train(config=config, loss_fn=objectives.get_objective("dpo"), loss_kwargs={"beta": 0.1},
          data_iterator=loader("preference.jsonl", num_epochs=None), reference="params",
          optimizer=OptimizerConfig(learning_rate=1e-3), num_steps=2,
          workdir=tmp_path / "run", evaluation=ev, **_RUN)
    start, end = _evals(tmp_path / "run")[0], _evals(tmp_path / "run")[2]
    # Policy == reference: every reward is 0, so no pair is ranked right (chosen > rejected
    # is strict), the margin is 0 and every pair's loss is ln 2.
    assert start["eval/accuracy"] == 0.0
    assert start["eval/margin"] == 0.0
    assert start["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Every held-out pair that fits seq_len, the last partial batch's too.
    assert start["eval/num_pairs"] == held.num_examples > 80
    assert end["eval/margin"] != 0.0 and end["eval/num_pairs"] == held.num_examples


class _SameBatch(CountingIterator):
    """make_batch(0) at every step; its state counts the batches taken."""

    def __init__(self, crash_at=None):
        super().__init__()
        self.crash_at = crash_at

    def __next__(self):
        if self.index == self.crash_at:
            raise RuntimeError("crash")
        self.index += 1
        return make_batch(0)


def _ascent_run(workdir, *, num_steps=10, data=None, **kwargs):
    """Gradient ascent (a negative constant rate) on the eval batch itself: the eval loss
    rises with every update, so the first evaluation stays the best and early stopping must
    fire."""
    ev = Evaluator(EvalConfig(data="unit", every=2, keep_best=True, early_stopping_patience=3,
                              on_start=False), [make_batch(0)])
    state = train(config=tiny_config(), loss_fn=token_nll, data_iterator=data or _SameBatch(),
                  optimizer=OptimizerConfig(learning_rate=-3e-3, schedule="constant",
                                            allow_nonpositive_learning_rate=True),
                  num_steps=num_steps, workdir=workdir, save_every=3, keep=1, seed=4,
                  export_hf_dir=os.path.join(workdir, "hf"), evaluation=ev, **_RUN, **kwargs)
    return state, ev


@pytest.mark.slow  # three short runs: about 40 s on 2 CPU cores
def test_keep_best_early_stopping_and_resume_equals_uninterrupted(tmp_path):
    whole = str(tmp_path / "whole")
    state, ev = _ascent_run(whole)
    # Evaluations at 2, 4, 6, 8: 4, 6 and 8 are worse than 2, the patience of 3 runs out at 8.
    assert int(state.step) == 8 and ev.tracker.best_step == 2
    assert ev.stop_reason.startswith("early stopping: eval loss did not improve for 3")
    evals = _evals(whole)
    assert sorted(evals) == [2, 4, 6, 8]
    assert all(evals[s]["eval/loss"] > evals[2]["eval/loss"] for s in (4, 6, 8))
    ckpt = Checkpointer(os.path.join(whole, "checkpoints"))
    # keep=1 keeps the latest (the stop, step 8) and the best (step 2) besides.
    assert ckpt.all_steps() == [2, 8]
    ckpt.close()
    best = load_params(os.path.join(whole, "checkpoints"), step=2)
    _, exported = load_hf(os.path.join(whole, "hf"))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(best)):
        np.testing.assert_array_equal(np.asarray(a), b)

    # The same run crashing after step 5 (checkpoints: 2 the best, 3 the save), then rerun:
    # the rerun resumes at 3 knowing the best is step 2, so it stops at 8 too.
    split = str(tmp_path / "split")
    with pytest.raises(RuntimeError, match="crash"):
        _ascent_run(split, data=_SameBatch(crash_at=5))
    state2, ev2 = _ascent_run(split)
    assert int(state2.step) == 8 and ev2.tracker == ev.tracker
    assert ev2.stop_reason == ev.stop_reason
    evals2 = _evals(split)
    assert sorted(evals2) == [2, 4, 6, 8]
    for s in evals:  # the same computation on the same devices: the same numbers
        assert evals2[s]["eval/loss"] == pytest.approx(evals[s]["eval/loss"], rel=1e-6)
    _, exported2 = load_hf(os.path.join(split, "hf"))
    for a, b in zip(jax.tree.leaves(exported2), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A rerun of the stopped run stops at once (its last checkpoint says so).
    state3, ev3 = _ascent_run(split)
    assert int(state3.step) == 8 and ev3.stop_reason == ev.stop_reason
