"""The host loop: non-finite stop, SIGTERM save, resume equals uninterrupted, metric files."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_fixtures import CountingIterator, nll_loss, ref_aware_loss, tiny_config

from align_jax import sharding
from align_jax.train import Checkpointer, NonFiniteLossError, OptimizerConfig, load_params, train
from align_jax.train import metrics as metrics_lib

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_script.py")
ROOT = os.path.dirname(os.path.dirname(HERE))


def _spawn(workdir, num_steps, save_every, sleep, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(workdir), str(num_steps), str(save_every), str(sleep),
         *extra],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run exited early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def _metric_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def _read_tb_scalars(logdir):
    """Parses TFRecord-framed Event protos (length, crc, data, crc) from the event files."""
    from tensorboardX.proto import event_pb2
    out = {}
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    data = CountingIterator(poison_at=4)  # the 5th batch: step 5
    match = r"non-finite loss at step 5.*checkpoint is step 4"
    with pytest.raises(NonFiniteLossError, match=match):
        train(config=tiny_config(), loss_fn=nll_loss, data_iterator=data,
              optimizer=OptimizerConfig(learning_rate=1e-3), num_steps=8,
              mesh_spec=sharding.MeshSpec(data=8), rules="dp", workdir=workdir, save_every=2,
              keep=5, log_every=1, progress=False)
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    params = load_params(workdir / "checkpoints")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert _metric_steps(workdir) == [1, 2, 3, 4]
    # Metrics reach TensorBoard too, with the same values as the JSONL file.
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    tb = _read_tb_scalars(workdir / "tensorboard")
    for r in records:
        assert tb[("train/loss", r["step"])] == pytest.approx(r["loss"], rel=1e-6)
        assert tb[("train/grad_norm", r["step"])] == pytest.approx(r["grad_norm"], rel=1e-6)
    assert {"loss", "grad_norm", "update_norm", "param_norm", "learning_rate"} <= set(records[0])
    assert "tokens_per_s" in records[-1] and "mfu" not in records[-1]  # CPU: no known peak
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["versions"]["jax"] == jax.__version__
    assert info["devices"]["count"] == 8 and info["num_steps"] == 8


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    proc = _spawn(workdir, num_steps=10_000, save_every=10_000, sleep=0.05)
    _wait_for(lambda: len(_metric_steps(workdir)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved a checkpoint" in out
    final = int(out.split("FINAL_STEP ")[1].split()[0])
    assert 2 <= final < 10_000
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.latest_step() == final
    # The data state saved with it points just past the last batch the state has seen.
    assert ckpt.data_state(final) == {"index": final}
    ckpt.close()
    assert _metric_steps(workdir)[-1] == final


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    import train_script
    ref = train_script.run(tmp_path / "ref", num_steps=8, save_every=100)
    ref_params = jax.device_get(ref.params)

    workdir = tmp_path / "run"
    proc = _spawn(workdir, num_steps=8, save_every=2, sleep=0.4)
    step4 = workdir / "checkpoints" / "4"
    _wait_for(lambda: step4.is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (workdir / "checkpoints" / "8").exists()

    proc = _spawn(workdir, num_steps=8, save_every=2, sleep=0.0)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "FINAL_STEP 8" in out
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["resumed_from_step"] >= 4
    resumed = load_params(workdir / "checkpoints", step=8)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(resumed),
                            jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=str(path))
    # Every step is in the metrics, those replayed after the kill included.
    assert set(_metric_steps(workdir)) == set(range(1, 9))
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.all_steps() == [6, 8]  # keep=2
    assert ckpt.data_state(8) == {"index": 8}
    ckpt.close()


@pytest.mark.slow
def test_reference_params_survive_resume_and_export(tmp_path):
    workdir = tmp_path / "run"
    kwargs = dict(config=tiny_config(), loss_fn=ref_aware_loss,
                  optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                  mesh_spec=sharding.MeshSpec(data=2, fsdp=4), rules="fsdp", workdir=workdir,
                  save_every=3, log_every=1, reference="params", progress=False, seed=5)
    first = train(data_iterator=CountingIterator(), num_steps=3, **kwargs)
    first_ref = jax.device_get(first.ref_params)
    data = CountingIterator()
    second = train(data_iterator=data, num_steps=5, export_hf_dir=tmp_path / "hf", **kwargs)
    assert int(second.step) == 5 and data.index == 5  # resumed at 3, consumed 2 more batches
    # The reference is rebuilt on resume (it is not checkpointed) and equals the first run's.
    for a, b in zip(jax.tree.leaves(jax.device_get(second.ref_params)), jax.tree.leaves(first_ref)):
        np.testing.assert_array_equal(a, b)
    with open(workdir / "metrics.jsonl") as f:
        dist = {r["step"]: r["ref_dist"] for r in map(json.loads, f)}
    assert dist[1] == 0.0  # the first update's loss sees the initial params
    p3 = load_params(workdir / "checkpoints", step=3)
    want = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - b) ** 2)
                       for a, b in zip(jax.tree.leaves(p3), jax.tree.leaves(first_ref))))
    assert want > 0 and dist[4] == pytest.approx(want, rel=1e-4)
    # The export is a Hugging Face checkpoint of the final params.
    from align_jax.models.hf import load_hf
    _, exported = load_hf(str(tmp_path / "hf"))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(jax.device_get(second.params))):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_reference_mode_is_checked(tmp_path):
    kwargs = dict(config=tiny_config(), loss_fn=nll_loss, num_steps=2, workdir=tmp_path / "run",
                  mesh_spec=sharding.MeshSpec(data=8), rules="dp", progress=False)
    with pytest.raises(ValueError, match=r"train\(reference='initial'\): choose one of"):
        train(data_iterator=CountingIterator(), reference="initial", **kwargs)
    with pytest.raises(ValueError, match="reference='adapters_off'.*needs lora"):
        train(data_iterator=CountingIterator(), reference="adapters_off", **kwargs)


@pytest.mark.slow  # builds the state (about 7 s on 2 CPU cores) before it reads a batch
def test_precomputed_reference_needs_ref_logps_in_the_batches(tmp_path):
    kwargs = dict(config=tiny_config(), loss_fn=nll_loss, num_steps=2, workdir=tmp_path / "run",
                  mesh_spec=sharding.MeshSpec(data=8), rules="dp", progress=False)
    # "precomputed" means every batch carries ref_logps: one without them stops before step 1.
    data = CountingIterator()
    with pytest.raises(ValueError, match="batches carry no 'ref_logps'"):
        train(data_iterator=data, reference="precomputed", **kwargs)
    assert data.index == 1 and not _metric_steps(tmp_path / "run")


def test_peak_flops_table_and_mfu():
    assert metrics_lib.peak_flops("NVIDIA H200") == 989e12
    assert metrics_lib.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert metrics_lib.peak_flops("TPU v5 lite") == 197e12
    assert metrics_lib.peak_flops("TPU v5") == 459e12
    assert metrics_lib.peak_flops("TPU v4") == 275e12
    assert metrics_lib.peak_flops("cpu") is None
    cfg = tiny_config()
    fpt = cfg.flops_per_token(16)
    util = metrics_lib.mfu(1e6, flops_per_token=fpt, num_devices=4, device_kind="TPU v4")
    assert util == pytest.approx(1e6 * fpt / (4 * 275e12))
    assert metrics_lib.mfu(1e6, flops_per_token=fpt, num_devices=4, device_kind="cpu") is None
