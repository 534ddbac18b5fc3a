"""The memory planner, and the compiled memory of the default train step (no weights allocated)."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from align_jax.models import transformer
from align_jax.models.config import get_config
from align_jax.train import plan

GiB = 1024 ** 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _activations(config, *, layers, batch_size, seq_len):
    cfg = dataclasses.replace(config, num_layers=layers)
    p = plan.plan_memory(cfg, method="sft", batch_size=batch_size, seq_len=seq_len,
                         num_devices=1)
    return p.compiled_temp - p.grads


def test_default_attention_memory_is_not_quadratic_per_layer():
    # A narrow model at T = 1024: one layer's float32 scores [B, N, T, T] are 16 MiB, far more
    # than everything else a layer keeps (T x D with D = 64). The reference attention keeps
    # them for every layer; the default must not: adding a layer adds less than one score copy.
    cfg = get_config("tiny", vocab_size=256, num_heads=4, num_kv_heads=2)
    t = 1024
    scores = 1 * cfg.num_heads * t * t * 4
    default = [_activations(cfg, layers=n, batch_size=1, seq_len=t) for n in (1, 3)]
    per_layer = (default[1] - default[0]) / 2
    assert per_layer < 0.5 * scores, (per_layer, scores)
    ref = dataclasses.replace(cfg, attention="xla", remat="none")
    xla = [_activations(ref, layers=n, batch_size=1, seq_len=t) for n in (1, 3)]
    assert (xla[1] - xla[0]) / 2 >= scores, "the check cannot fail: the reference is not larger"


@pytest.mark.slow
def test_llama3_1b_default_sft_step_compiles_below_40_gib():
    # Abstract inputs only: the 1.2B params are ShapeDtypeStructs. About 40 s of compile.
    p = plan.plan_memory(get_config("llama3_1b"), method="sft", batch_size=8, seq_len=2048,
                         num_devices=1)
    assert p.compiled_total < 40 * GiB, plan.format_plan(p, [])


def test_plan_parts_follow_the_shardings():
    # 8 fake devices, fsdp over all: the state divides by 8, a replicated run's does not.
    cfg = get_config("tiny", vocab_size=256)
    one = plan.plan_memory(cfg, method="sft", batch_size=8, seq_len=32, num_devices=1,
                           compile=False)
    n = sum(x.size for x in jax.tree.leaves(nn.unbox(transformer.abstract_params(cfg))))
    assert one.params == 4 * n and one.grads == 4 * n and one.opt_state >= 8 * n
    fsdp = plan.plan_memory(cfg, method="dpo_frozen", batch_size=8, seq_len=32,
                            mesh_spec=plan.sharding.MeshSpec(data=1, fsdp=-1), num_devices=8)
    assert fsdp.params <= one.params / 4 and fsdp.ref_params == fsdp.params
    assert fsdp.compiled_total is not None and fsdp.compiled_total > fsdp.lower_bound / 2


@pytest.mark.parametrize("method", ["dpo", "sami"])
def test_plan_compiles_every_method(method):
    p = plan.plan_memory(get_config("tiny", vocab_size=256), method=method, batch_size=2,
                         seq_len=16, num_devices=1)
    assert p.compiled_temp > 0 and p.fits("tpu-v5e")[0]


def test_lora_plan_holds_the_base_once_and_adapters_sharded_by_expert():
    # A tiny Mixtral, DPO with LoRA on attention and experts, experts over fsdp = 4.
    cfg = get_config("tiny", family="mixtral", vocab_size=256, num_experts=4,
                     tie_embeddings=False)
    lora = {"rank": 4, "alpha": 8, "targets": ("q", "v", "gate", "up", "down"),
            "base_dtype": "bfloat16"}
    spec = plan.sharding.MeshSpec(data=2, fsdp=4)
    full = plan.plan_memory(cfg, method="dpo", batch_size=8, seq_len=16, mesh_spec=spec,
                            num_devices=8, compile=False)
    p = plan.plan_memory(cfg, method="dpo", batch_size=8, seq_len=16, mesh_spec=spec,
                         num_devices=8, lora=lora)
    assert p.lora and not full.lora
    # The bfloat16 base is half the float32 params, and the adapters a small fraction.
    assert p.ref_params == full.params // 2
    assert p.params < full.params / 10 and p.grads == p.params
    assert p.compiled_total is not None and p.compiled_temp > 0
    assert "frozen base" in plan.format_plan(p, [])


def test_8b_full_finetune_refused_on_one_80gb_device():
    # Arithmetic only (compiling 8B on a shared 2-core host takes minutes): float32 params,
    # AdamW moments and gradients are 16 bytes a parameter, ~120 GiB before any activation.
    p = plan.plan_memory(get_config("llama3_8b"), method="sft", batch_size=1, seq_len=2048,
                         num_devices=1, compile=False)
    ok, why = p.fits("h100-80gb")
    assert not ok
    assert "alone need" in why and "h100-80gb" in why, why
    assert p.lower_bound > 110 * GiB
    # Sharded over 8 devices it is 1/8 of that, which the planner then accepts on state alone.
    p8 = plan.plan_memory(get_config("llama3_8b"), method="sft", batch_size=8, seq_len=2048,
                          mesh_spec=plan.sharding.MeshSpec(data=1, fsdp=-1), num_devices=8,
                          compile=False)
    assert p8.fits("h100-80gb")[0] and p8.lower_bound < p.lower_bound / 7


def test_plan_for_mesh_larger_than_host_is_arithmetic_with_reason():
    p = plan.plan_memory(get_config("tiny"), method="sft", batch_size=64, seq_len=16,
                         mesh_spec=plan.sharding.MeshSpec(data=-1), num_devices=64)
    assert p.compiled_total is None and "64 devices" in p.note


@pytest.mark.slow
def test_tiny_plan_within_20_percent_of_a_measured_cpu_step():
    # A fresh process on one CPU device: see memory_probe.py for how the step is measured.
    # Measured/planned was 1.02 at 4 x 512 and 1.22 at 8, 16 and 32 x 512 (see plan.HEADROOM).
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train", "memory_probe.py"),
                          "4", "512"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["measured_step"] > 40 * 2 ** 20, got  # the step itself dominates the measure
    ratio = got["planned_total"] / got["measured_total"]
    assert 0.8 <= ratio <= 1.2, got


def test_plan_cli_refuses_and_writes_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "align_jax.cli", "plan", "--gin_file=configs/runs/plan.gin",
         "--gin_param=plan.plan_main.model='llama3_8b'", "--gin_param=plan.plan_main.compile=False",
         "--gin_param=plan.plan_main.seq_len=128", "--gin_param=plan.plan_main.batch_size=1",
         "--gin_param=plan.plan_main.num_devices=1",
         "--gin_param=plan.plan_main.accelerators=('h100-80gb',)", f"--output_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "h100-80gb: does NOT fit" in out.stdout
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["fits"]["h100-80gb"]["fits"] is False and saved["params"] > 25 * GiB
