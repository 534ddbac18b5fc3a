"""Multi-process runs on one machine: 2 CPU processes of 4 fake devices each, joined by
jax.distributed over 127.0.0.1, against the single-process 8-device run, through the real CLI."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from reduction_order import ADAM_EPS, trained_params_atol

from align_jax import distributed
from align_jax.train.checkpoint import load_params

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Generous: a busy 2-core machine runs these several times slower than an idle one.
TIMEOUT = 600
# SFT on the tiny model, params and batch both sharded over the 8 devices of 2 processes.
# A constant learning rate: the 2-step run and the 4-step run follow the same schedule.
PARAMS = ["entry.train_main.progress=False", "entry.train_main.log_every=1",
          "entry.train_main.save_every=2", "entry.train_main.keep=3",
          "entry.train_main.seq_len=64", "entry.train_main.export_hf=False",
          "sharding.MeshSpec.data=4", "sharding.MeshSpec.fsdp=2", "RULES='fsdp'",
          "optim.OptimizerConfig.schedule='constant'", "optim.OptimizerConfig.warmup_steps=0",
          "optim.OptimizerConfig.learning_rate=3e-3",
          # An Adam eps that float32 reduction order cannot flip a step with (reduction_order).
          f"optim.OptimizerConfig.eps={ADAM_EPS}"]
LEARNING_RATE = 3e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    # The 1-process runs compile the same programs: the resumed run reads the full run's.
    _CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    _CACHE.clear()


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ALIGN_JAX_", "SLURM_", "OMPI_")) and k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=str(ROOT), **{k: str(v) for k, v in extra.items()})
    if devices == 8:
        # Only the 1-process runs share compiled programs (the resumed run reads the full run's):
        # in the 2-process runs one process would start its steps while the other compiles.
        env.update(JAX_COMPILATION_CACHE_DIR=_CACHE["dir"],
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _cmd(out, tokenizer, *params, distributed_flag=True):
    return [sys.executable, "-m", "align_jax.cli", "train",
            "--gin_file=configs/runs/sft_tiny.gin", f"--output_dir={out}",
            *(["--distributed"] if distributed_flag else []),
            *[f"--gin_param={p}" for p in [*PARAMS, f"entry.train_main.tokenizer='{tokenizer}'",
                                           *params]]]


def _start_two(out, tokenizer, *params, per_process=((), ()), **env):
    port = _free_port()
    return [subprocess.Popen(
        _cmd(out, tokenizer, *params, *per_process[i]), cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_env(4, ALIGN_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 ALIGN_JAX_NUM_PROCESSES=2, ALIGN_JAX_PROCESS_ID=i, **env))
        for i in range(2)]


def _wait(procs, timeout=TIMEOUT):
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process hung for {timeout}s")
        results.append((p.returncode, err))
    return results


def _run_one(out, tokenizer, *params):
    res = subprocess.run(_cmd(out, tokenizer, *params, distributed_flag=False), cwd=ROOT,
                         env=_env(8), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from align_jax.train.entry import build_tokenizer
    return build_tokenizer(str(ROOT / "examples" / "values_document.md"),
                           str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """A 2-process run of 2 steps, then a 1-process resume to 4; a 1-process run of 4 steps."""
    two = str(tmp_path_factory.mktemp("two_processes"))
    full = str(tmp_path_factory.mktemp("one_process"))
    t0 = time.time()
    procs = _start_two(two, tokenizer, "entry.train_main.num_steps=2",
                       ALIGN_JAX_INIT_TIMEOUT=300)
    try:
        _run_one(full, tokenizer, "entry.train_main.num_steps=4")
        results = _wait(procs)
    finally:
        for p in procs:
            p.kill()
    for rc, err in results:
        assert rc == 0, err[-3000:]
    two_losses = _losses(two)
    t1 = time.time()
    _run_one(two, tokenizer, "entry.train_main.num_steps=4")  # resume on 1 process
    print(f"2-process run with the 1-process run beside it: {t1 - t0:.0f}s; "
          f"1-process resume: {time.time() - t1:.0f}s")
    return {"two": two, "full": full, "two_losses": two_losses}


def test_two_processes_equal_one_process(runs):
    full = _losses(runs["full"])
    assert sorted(runs["two_losses"]) == [1, 2]
    for step, loss in runs["two_losses"].items():
        np.testing.assert_allclose(loss, full[step], rtol=1e-5, err_msg=f"step {step}")
    a = load_params(os.path.join(runs["two"], "checkpoints"), step=2)
    b = load_params(os.path.join(runs["full"], "checkpoints"), step=2)
    # Summed in another order across 2 processes: the bound of reduction_order, not 1e-6.
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=0, atol=trained_params_atol(
        learning_rate=LEARNING_RATE, num_steps=2))
    print(f"2 processes vs 1: max loss difference "
          f"{max(abs(v - full[k]) for k, v in runs['two_losses'].items()):.2e}, max param "
          f"difference {np.abs(_flat(a) - _flat(b)).max():.2e}")
    # One writer: process 0's metrics only, one record per step (then the resumed run's).
    with open(os.path.join(runs["two"], "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert os.path.exists(os.path.join(runs["two"], "train_summary.json"))


def test_resume_on_one_process_continues_the_two_process_run(runs):
    full, resumed = _losses(runs["full"]), _losses(runs["two"])
    for step in (3, 4):
        np.testing.assert_allclose(resumed[step], full[step], rtol=1e-5, err_msg=f"step {step}")
    a = _flat(load_params(os.path.join(runs["two"], "checkpoints"), step=4))
    b = _flat(load_params(os.path.join(runs["full"], "checkpoints"), step=4))
    np.testing.assert_allclose(a, b, rtol=0, atol=trained_params_atol(
        learning_rate=LEARNING_RATE, num_steps=4))
    print(f"resumed on 1 vs uninterrupted: max loss difference "
          f"{max(abs(resumed[k] - full[k]) for k in (3, 4)):.2e}, max param difference "
          f"{np.abs(a - b).max():.2e}")


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in _leaves(tree)])


def test_different_configs_stop_both_processes_naming_the_binding(tmp_path, tokenizer):
    procs = _start_two(str(tmp_path), tokenizer, per_process=(
        ["entry.train_main.num_steps=2"], ["entry.train_main.num_steps=3"]),
        ALIGN_JAX_INIT_TIMEOUT=300)
    for rc, err in _wait(procs):
        assert rc == 1, err[-2000:]
        assert "process 1 runs a different configuration" in err, err[-2000:]
        assert "entry.train_main.num_steps = 2" in err and "num_steps = 3" in err, err[-2000:]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_job_started_on_one_worker_only_times_out_clearly(tmp_path, tokenizer):
    port = _free_port()
    t0 = time.time()
    # The settings as gin bindings this time (the environment gives the rest).
    res = subprocess.run(
        _cmd(str(tmp_path), tokenizer, "distributed.initialize.coordinator_address='127.0.0.1'",
             f"distributed.initialize.port={port}", "distributed.initialize.init_timeout=3"),
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
        env=_env(4, ALIGN_JAX_NUM_PROCESSES=2, ALIGN_JAX_PROCESS_ID=0))
    assert res.returncode == 1, res.stderr[-2000:]
    assert "did not all join within 3s" in res.stderr
    assert f"127.0.0.1:{port}" in res.stderr and "started on every host" in res.stderr
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_a_dead_process_stops_the_other(tmp_path, tokenizer):
    procs = _start_two(str(tmp_path), tokenizer, "entry.train_main.num_steps=100000",
                       "entry.train_main.save_every=100000",
                       ALIGN_JAX_INIT_TIMEOUT=300, ALIGN_JAX_HEARTBEAT_TIMEOUT=5)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            errors = [p.communicate()[1][-3000:] for p in procs]
            pytest.fail(f"the run did not start: {errors}")
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    (rc, err), _ = _wait(procs, timeout=120)
    took = time.time() - t0
    assert rc != 0
    # Killed between steps, the coordinator's heartbeat check stops process 0 after 5 s ("task
    # died"); killed inside a collective, gloo aborts at once on the broken connection.
    assert "another task died" in err or "unhealthy" in err or "gloo" in err, err[-3000:]
    assert took < 60, took
    print(f"process 0 stopped {took:.1f}s after process 1 was killed")


def test_config_difference_names_the_process_and_lines():
    assert distributed.config_difference(["a = 1\nb = 2", "a = 1\nb = 2"]) is None
    msg = distributed.config_difference(["a = 1\nb = 2", "a = 1\nb = 2", "a = 1\nb = 3"])
    assert msg.startswith("process 2 runs a different configuration")
    assert "- b = 2" in msg and "+ b = 3" in msg


def test_config_text_ignores_the_process_id_binding():
    a = distributed.config_text("train", "x = 1\ndistributed.initialize.process_id = 0")
    b = distributed.config_text("train", "x = 1\ndistributed.initialize.process_id = 1")
    assert a == b and "x = 1" in a and "jax = " in a
    assert a != distributed.config_text("eval", "x = 1")


def test_settings_from_arguments_environment_and_defaults():
    env = {"ALIGN_JAX_COORDINATOR_ADDRESS": "10.0.0.2", "ALIGN_JAX_NUM_PROCESSES": "4",
           "ALIGN_JAX_PROCESS_ID": "3", "ALIGN_JAX_INIT_TIMEOUT": "30"}
    s = distributed.resolve(environ=env)
    assert (s.coordinator_address, s.port, s.num_processes, s.process_id, s.init_timeout) == (
        f"10.0.0.2:{distributed.DEFAULT_PORT}", distributed.DEFAULT_PORT, 4, 3, 30)
    s = distributed.resolve(coordinator_address="h", port=1234, process_id=0, environ=env)
    assert (s.coordinator_address, s.port, s.process_id) == ("h:1234", 1234, 0)
    assert distributed.resolve(environ={"ALIGN_JAX_COORDINATOR_PORT": "9000"}).port == 9000
    s = distributed.resolve(environ={"SLURM_JOB_ID": "7"})
    assert s.coordinator_address is None and s.cluster == "SLURM"
    with pytest.raises(distributed.DistributedError, match="port 1 but port is set to 2"):
        distributed.resolve(coordinator_address="h:1", port=2, environ={})
    with pytest.raises(distributed.DistributedError, match="ALIGN_JAX_NUM_PROCESSES='x'"):
        distributed.resolve(environ={"ALIGN_JAX_NUM_PROCESSES": "x"})
    with pytest.raises(distributed.DistributedError, match="process_id=4 with num_processes=4"):
        distributed.resolve(environ={**env, "ALIGN_JAX_PROCESS_ID": "4"})


# Sampled generation, generation with scored continuations and score_continuations on a
# data x fsdp mesh: prompts and sampler state go onto devices of both processes, results come
# back gathered to every process.
GENERATE = """
import json, os, sys
import jax
import numpy as np
if int(os.environ.get("NPROC", "1")) > 1:
    jax.distributed.initialize(os.environ["COORD"], num_processes=2,
                               process_id=int(os.environ["PID"]))
from align_jax import sharding
from align_jax.generate import generate, score_continuations
from align_jax.models import transformer
from align_jax.models.config import get_config
cfg = get_config("tiny", vocab_size=300, max_position=128)
mesh = sharding.make_mesh(sharding.MeshSpec(data=-1, fsdp=2))
params = sharding.put(transformer.init_params(cfg, jax.random.key(0)),
                      sharding.tree_shardings(transformer.abstract_params(cfg), mesh, "fsdp"))
rng = np.random.default_rng(0)
prompts = [rng.integers(3, 300, size=int(rng.integers(3, 20))).tolist() for _ in range(13)]
out = generate(cfg, params, prompts, max_new_tokens=6, temperature=0.7, seed=3, mesh=mesh,
               rules="fsdp", continuations=[[[5, 6, 7]] for _ in prompts])
scores = score_continuations(cfg, params, prompts, [[[5, 6, 7], [8]] for _ in prompts],
                             mesh=mesh, rules="fsdp")
json.dump({"tokens": out.tokens, "logprobs": out.logprobs,
           "continuations": out.continuation_logps, "scores": scores},
          open(sys.argv[1] + "." + os.environ.get("PID", "one") + ".json", "w"))
"""


def test_generation_on_two_processes_equals_one_process(tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    out = str(tmp_path / "out")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), out], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(4, NPROC=2, PID=i, COORD=f"127.0.0.1:{port}"))
             for i in range(2)]
    res = subprocess.run([sys.executable, str(script), out], cwd=ROOT, env=_env(8),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    for rc, err in _wait(procs):
        assert rc == 0, err[-3000:]
    one = json.loads(open(out + ".one.json").read())
    for pid in (0, 1):
        two = json.loads(open(f"{out}.{pid}.json").read())
        assert two["tokens"] == one["tokens"], pid
        for key in ("logprobs", "continuations", "scores"):
            for a, b in zip(two[key], one[key]):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=key)


def _recipe_on_two_and_one(tmp_path, gin_file, params):
    """`align-jax run` of a recipe on 2 processes x 4 devices and on 1 x 8: (two, one) dirs."""
    def cmd(out, flag):
        return [sys.executable, "-m", "align_jax.cli", "run", f"--gin_file={gin_file}",
                f"--output_dir={out}", *flag, *[f"--gin_param={p}" for p in params]]
    port = _free_port()
    procs = [subprocess.Popen(cmd(tmp_path / "two", ["--distributed"]), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(4, ALIGN_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       ALIGN_JAX_NUM_PROCESSES=2, ALIGN_JAX_PROCESS_ID=i,
                                       ALIGN_JAX_INIT_TIMEOUT=300))
             for i in range(2)]
    res = subprocess.run(cmd(tmp_path / "one", []), cwd=ROOT, env=_env(8), capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    for rc, err in _wait(procs):
        assert rc == 0, err[-3000:]
    return tmp_path / "two", tmp_path / "one"


@pytest.mark.slow
def test_sami_recipe_on_two_processes_equals_one_process(tmp_path):
    """The SAMI recipe (sample, train, MI bound) through the real CLI on 2 x 4 devices."""
    from tiny_checkpoints import tiny_document_model
    base = tiny_document_model(tmp_path / "base")
    two, one = _recipe_on_two_and_one(
        tmp_path, "configs/runs/sami_recipe_tiny.gin",
        [f"HF_CHECKPOINT='{base}'", "sami.sami.num_iterations=1", "sami.sami.max_new_tokens=8",
         "sami.sami.progress=False"])
    # The same samples (the generation), the same training and the same bound.
    data = "iter_1/data.jsonl"
    assert (two / data).read_text() == (one / data).read_text()
    rows_two, rows_one = (json.loads((d / "report.json").read_text())["iterations"]
                          for d in (two, one))
    for a, b in zip(rows_two, rows_one):
        np.testing.assert_allclose(a["mi_bound"], b["mi_bound"], atol=1e-5)
        np.testing.assert_allclose(a["params_checksum"], b["params_checksum"], rtol=1e-6)


@pytest.mark.slow
def test_value_alignment_recipe_on_two_processes_equals_one_process(tmp_path):
    """The main job (c-fine-tune, SFT, DPO, evaluation with RAG and BERTScore) on 2 x 4."""
    steps = [f"value_alignment.value_alignment.{k}=2"
             for k in ("cft_steps", "sft_steps", "dpo_steps")]
    two, one = _recipe_on_two_and_one(
        tmp_path, "configs/runs/value_alignment_tiny.gin",
        [*steps, "value_alignment.value_alignment.max_new_tokens=4",
         "value_alignment.value_alignment.progress=False"])
    a, b = (json.loads((d / "report.json").read_text()) for d in (two, one))
    assert a["answers"] == b["answers"]
    for system, metrics in b["generation"]["metrics"].items():
        assert a["generation"]["metrics"][system] == pytest.approx(metrics, rel=1e-5), system
    for name, row in b["models"].items():
        assert a["models"][name]["answer_nll"]["nll_per_token"] == pytest.approx(
            row["answer_nll"]["nll_per_token"], rel=1e-5)
        assert a["models"][name]["preference"] == pytest.approx(row["preference"], abs=1e-4)
