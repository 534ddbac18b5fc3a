"""The pod script's commands, checked in dry-run mode (no gcloud needed)."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
POD = ROOT / "launch" / "tpu" / "pod.sh"


def _pod(*args):
    env = dict(os.environ, DRY_RUN="1", TPU_NAME="t1", ZONE="z1", ACCELERATOR="v5p-16",
               PROJECT="p1", SPOT="1")
    out = subprocess.run(["bash", str(POD), *args], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout


def test_create_uses_settings():
    out = _pod("create")
    assert "gcloud compute tpus tpu-vm create t1" in out
    for flag in ("--accelerator-type=v5p-16", "--zone=z1", "--project=p1", "--spot"):
        assert flag in out


def test_run_targets_every_worker_and_quotes_params():
    out = _pod("run", "configs/runs/sft.gin", "--gin_param=train.num_steps=5")
    assert "--worker=all" in out
    assert "align-jax run --gin_file=configs/runs/sft.gin" in out
    assert "train.num_steps=5" in out


def test_stop_sends_sigterm():
    assert "pkill -TERM" in _pod("stop")


def test_missing_settings_fail_clearly():
    env = {k: v for k, v in os.environ.items() if k != "TPU_NAME"}
    res = subprocess.run(["bash", str(POD), "create"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "TPU_NAME" in res.stderr


@pytest.mark.parametrize("script", ["launch/tpu/pod.sh", "launch/gpu/slurm.sbatch"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
