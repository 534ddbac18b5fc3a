"""Runs align_jax.train.train on the tiny model; the subprocess side of the loop tests.

usage: python train_script.py WORKDIR NUM_STEPS SAVE_EVERY SLEEP_PER_BATCH [lora]
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from train_fixtures import CountingIterator, nll_loss, tiny_config  # noqa: E402

from align_jax import sharding, train  # noqa: E402

OPTIMIZER = train.OptimizerConfig(learning_rate=1e-3, warmup_steps=2, weight_decay=0.01)
LORA = {"rank": 4, "alpha": 8, "targets": ("q", "v", "o", "up"), "dropout": 0.1,
        "base_dtype": "bfloat16"}


def run(workdir, num_steps, save_every, sleep=0.0, lora=None):
    return train.train(lora=lora,
        config=tiny_config(), loss_fn=nll_loss, data_iterator=CountingIterator(sleep=sleep),
        optimizer=OPTIMIZER, num_steps=num_steps, grad_accum=2,
        mesh_spec=sharding.MeshSpec(data=4, fsdp=2), rules="fsdp", workdir=workdir,
        save_every=save_every, keep=2, log_every=1, seed=3, progress=False)


if __name__ == "__main__":
    workdir, num_steps, save_every, sleep = sys.argv[1:5]
    lora = LORA if sys.argv[5:] == ["lora"] else None
    state = run(workdir, int(num_steps), int(save_every), float(sleep), lora=lora)
    print(f"FINAL_STEP {int(state.step)}", flush=True)
