"""Run as a script: plans and then runs one real SFT step of the tiny model on one CPU device,
and prints JSON with the planned and the measured memory of the step.

Measured: the growth of the process's resident set while a second step runs (the first pays
one-time runtime set-up). Just before it, malloc_trim returns freed memory to the OS and the
peak (VmHWM) is reset (`/proc/self/clear_refs` 5, Linux >= 4.0), so the peak minus the resident
set at that moment is what executing the step allocated and touched: its temporaries and
non-donated outputs. Planned: the
same quantity from the compiled step's buffer assignment, outputs - aliased + temporaries.
"""

import ctypes
import json
import sys

import jax
import numpy as np

from align_jax import sharding
from align_jax.models import transformer
from align_jax.models.config import get_config
from align_jax.train import compile as compile_lib
from align_jax.train import plan
from align_jax.train.optim import OptimizerConfig, make_optimizer
from align_jax.train.state import abstract_state, train_state_shardings


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(batch_size: int, seq_len: int) -> None:
    config = get_config("tiny")
    p = plan.plan_memory(config, method="sft", batch_size=batch_size, seq_len=seq_len,
                         num_devices=1)
    mesh = sharding.make_mesh(sharding.MeshSpec(), devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimizerConfig(), num_steps=1000)
    abstract = abstract_state(transformer.abstract_params(config), tx=tx)
    shardings = train_state_shardings(abstract, mesh, "fsdp")
    batch = {k: np.ones(v.shape, v.dtype) for k, v in plan.abstract_batch(
        "sft", batch_size=batch_size, seq_len=seq_len).items()}
    rng = np.random.default_rng(0)
    batch["tokens"] = rng.integers(0, config.vocab_size, batch["tokens"].shape).astype(np.int32)
    batch["targets"] = rng.integers(0, config.vocab_size, batch["tokens"].shape).astype(np.int32)
    batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), batch["tokens"].shape)
    batch = jax.device_put(batch, compile_lib.batch_shardings(mesh, "fsdp"))
    params = transformer.init_params(config, jax.random.key(0), mesh=mesh)
    state = compile_lib.init_train_state(params, tx=tx, seed=0, state_shardings=shardings)
    compiled = plan.lower_train_step(
        config, loss_fn=plan.METHODS["sft"][0], batch=batch, tx=tx, schedule=schedule, mesh=mesh,
        rules="fsdp", abstract=abstract, shardings=shardings).compile()
    with sharding.use_mesh(mesh, "fsdp"):
        # A first step pays one-time runtime set-up (thread pools, kernels); measure the second.
        state, _ = jax.block_until_ready(compiled(state, batch))
    inputs = sum(x.nbytes for x in jax.tree.leaves((state, batch)))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss("VmRSS")
    with sharding.use_mesh(mesh, "fsdp"):
        new_state, metrics = compiled(state, batch)
    jax.block_until_ready((new_state, metrics))
    peak = _rss("VmHWM")
    assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 2
    print(json.dumps({"planned_step": p.compiled_total - p.compiled_arguments,
                      "measured_step": peak - before, "planned_total": p.compiled_total,
                      "measured_total": peak - before + inputs, "inputs": inputs}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
