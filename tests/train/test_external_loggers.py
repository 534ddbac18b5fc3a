"""Optional W&B / MLflow writers: used when asked for and installed, one line when missing."""

import json
import logging
import os
import sys
import types

import pytest

from align_jax.train.metrics import ExternalLogging, MetricsLogger


def _fake_wandb(calls):
    """A stand-in `wandb` module recording init / run.log / run.finish."""
    run = types.SimpleNamespace(
        log=lambda values, *, step: calls.append(("log", step, dict(values))),
        finish=lambda: calls.append(("finish",)))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return run

    return types.SimpleNamespace(init=init)


def _fake_mlflow(calls):
    return types.SimpleNamespace(
        start_run=lambda **kw: calls.append(("start_run", kw)),
        log_params=lambda params: calls.append(("log_params", dict(params))),
        log_metrics=lambda values, *, step: calls.append(("log_metrics", step, dict(values))),
        end_run=lambda: calls.append(("end_run",)))


def _run(workdir, external, num_steps=4):
    logger = MetricsLogger(workdir, num_steps=num_steps, log_every=2, progress=False,
                           tensorboard=False, external=external)
    for step in range(1, num_steps + 1):
        logger.record(step, {"loss": 1.0 / step}, tokens=16)
    logger.close()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_wandb_and_mlflow_get_the_records(tmp_path, monkeypatch):
    wandb_calls, mlflow_calls = [], []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(wandb_calls))
    monkeypatch.setitem(sys.modules, "mlflow", _fake_mlflow(mlflow_calls))
    config = {"objective": "sft", "optimizer": {"learning_rate": 0.001}}
    records = _run(str(tmp_path), ExternalLogging(names=("wandb", "mlflow"), run_name="r1",
                                                  config=config))
    assert wandb_calls[0] == ("init", {"name": "r1", "config": config, "dir": str(tmp_path)})
    logged = [c for c in wandb_calls if c[0] == "log"]
    assert [c[1] for c in logged] == [r["step"] for r in records] == [2, 4]
    assert [c[2]["loss"] for c in logged] == [r["loss"] for r in records] == [0.5, 0.25]
    assert all("step" not in c[2] and "time" not in c[2] for c in logged)
    assert wandb_calls[-1] == ("finish",) and wandb_calls.count(("finish",)) == 1
    assert mlflow_calls[0] == ("start_run", {"run_name": "r1"})
    assert mlflow_calls[1] == ("log_params", {"objective": "sft",
                                              "optimizer.learning_rate": "0.001"})
    assert [(c[1], c[2]["loss"]) for c in mlflow_calls if c[0] == "log_metrics"] == [
        (2, 0.5), (4, 0.25)]
    assert mlflow_calls[-1] == ("end_run",)


def test_asked_for_but_not_installed_is_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with caplog.at_level(logging.WARNING, logger="align_jax.train.metrics"):
        records = _run(str(tmp_path), ExternalLogging(names=("wandb",)))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["loggers: 'wandb' was asked for but is not installed (pip install wandb); "
                     "metrics go to metrics.jsonl and TensorBoard only"]
    assert [r["step"] for r in records] == [2, 4]


def test_not_asked_for_is_not_imported(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    _run(str(tmp_path), None)
    _run(str(tmp_path / "b"), ExternalLogging())
    assert calls == []
    with pytest.raises(ValueError, match="loggers: unknown logger 'tensorboard'"):
        ExternalLogging(names=("tensorboard",))
