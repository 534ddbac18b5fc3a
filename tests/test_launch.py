"""The launch scripts' commands, checked in dry-run mode (no gcloud or SLURM needed)."""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
POD = ROOT / "launch" / "tpu" / "pod.sh"
SLURM = ROOT / "launch" / "gpu" / "slurm.sbatch"
SCRIPTS = ["launch/tpu/pod.sh", "launch/gpu/slurm.sbatch"]
_SETTINGS = ("COORDINATOR_PORT", "COORDINATOR_ADDRESS", "INIT_TIMEOUT", "HEARTBEAT_TIMEOUT")


def _clean_env(**extra):
    # ALIGN_JAX_* of the test process itself (conftest turns the compilation cache off) would
    # show in the scripts' dry-run listing of the settings they export.
    return {**{k: v for k, v in os.environ.items()
               if k not in _SETTINGS and not k.startswith("ALIGN_JAX_")}, **extra}


def _pod(*args, **settings):
    env = _clean_env(DRY_RUN="1", TPU_NAME="t1", ZONE="z1", ACCELERATOR="v5p-16",
                     PROJECT="p1", SPOT="1", **settings)
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
    assert "align-jax run --distributed --gin_file=configs/runs/sft.gin" in out
    assert "train.num_steps=5" in out


def test_setup_dry_run_prints_the_archive_and_copy_without_writing(tmp_path):
    out = _pod("setup", TMPDIR=str(tmp_path))
    assert "archive --format=tar.gz" in out and "gcloud compute tpus tpu-vm scp" in out
    assert not list(tmp_path.rglob("*.tar.gz"))


def test_stop_sends_sigterm():
    assert "pkill -TERM" in _pod("stop")


def test_missing_settings_fail_clearly():
    env = {k: v for k, v in os.environ.items() if k != "TPU_NAME"}
    res = subprocess.run(["bash", str(POD), "create"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "TPU_NAME" in res.stderr


def test_run_joins_the_workers_with_the_coordinator_settings():
    out = _pod("run", "configs/runs/sft.gin")
    assert "align-jax run --distributed --gin_file=configs/runs/sft.gin" in out
    for setting in ("ALIGN_JAX_COORDINATOR_PORT=8476", "ALIGN_JAX_INIT_TIMEOUT=300",
                    "ALIGN_JAX_HEARTBEAT_TIMEOUT=100"):
        assert setting in out
    assert "ALIGN_JAX_COORDINATOR_ADDRESS" not in out  # jax finds worker 0 on a TPU pod
    out = _pod("run", "configs/runs/sft.gin", COORDINATOR_PORT="9123", INIT_TIMEOUT="60",
               HEARTBEAT_TIMEOUT="20", COORDINATOR_ADDRESS="10.1.2.3")
    for setting in ("ALIGN_JAX_COORDINATOR_PORT=9123", "ALIGN_JAX_INIT_TIMEOUT=60",
                    "ALIGN_JAX_HEARTBEAT_TIMEOUT=20", "ALIGN_JAX_COORDINATOR_ADDRESS=10.1.2.3"):
        assert setting in out


def test_slurm_passes_the_coordinator_settings_to_every_task():
    env = _clean_env(DRY_RUN="1", SLURM_JOB_ID="7", COORDINATOR_PORT="9200", INIT_TIMEOUT="90",
                     COMMAND="train")
    out = subprocess.run(["bash", str(SLURM), "configs/runs/sft.gin", "--gin_param=a='b c'"],
                         env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[:3] == ["ALIGN_JAX_COORDINATOR_PORT=9200", "ALIGN_JAX_HEARTBEAT_TIMEOUT=100",
                         "ALIGN_JAX_INIT_TIMEOUT=90"]
    assert lines[3].startswith("srun --kill-on-bad-exit=1 .venv/bin/align-jax train "
                               "--distributed --gin_file=configs/runs/sft.gin")
    assert r"--gin_param=a=\'b\ c\'" in lines[3]
    res = subprocess.run(["bash", str(SLURM)], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "usage" in res.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_shellcheck(script):
    res = subprocess.run(["shellcheck", "-s", "bash", str(ROOT / script)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout
