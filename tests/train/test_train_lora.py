"""LoRA training: only adapters change, resume equals uninterrupted, exports, step memory."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import _metric_steps, _spawn, _wait_for
from train_fixtures import CountingIterator, nll_loss, tiny_config

from align_jax import sharding
from align_jax.losses.objectives import get_objective
from align_jax.models import hf, lora, transformer
from align_jax.models.config import get_config
from align_jax.train import OptimizerConfig, load_params, train
from align_jax.train.adapters import compiled_step_memory
from align_jax.train.optim import make_optimizer

LORA = {"rank": 4, "alpha": 8, "targets": ("q", "v", "down")}


def _run(workdir, num_steps, params0, **kw):
    return train(config=tiny_config(), params_init=params0, loss_fn=nll_loss,
                 data_iterator=CountingIterator(), num_steps=num_steps,
                 optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                 mesh_spec=sharding.MeshSpec(data=2, fsdp=4), rules="fsdp", workdir=workdir,
                 save_every=3, log_every=1, seed=2, progress=False, **kw)


def test_only_adapters_change_resume_and_export(tmp_path):
    config = tiny_config()
    params0 = jax.device_get(transformer.init_params(config, jax.random.key(1)))
    full = _run(tmp_path / "a", 5, params0, lora=LORA, export_hf_dir=tmp_path / "hf",
                export_peft_dir=tmp_path / "peft")
    # The frozen base is bit-identical to the initial params after 5 updates.
    for a, b in zip(jax.tree.leaves(jax.device_get(full.ref_params)), jax.tree.leaves(params0)):
        np.testing.assert_array_equal(a, b)
    # Checkpoints hold the adapters only.
    saved = load_params(tmp_path / "a" / "checkpoints")
    names = {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(saved)}
    assert names == {"q_a", "q_b", "v_a", "v_b", "down_a", "down_b"}
    weights = jax.device_get(full.params)
    assert float(np.abs(weights["layers"]["attn"]["q_b"]).max()) > 0  # B has left zero

    # Stopped at 3 and resumed to 5 == the uninterrupted run.
    _run(tmp_path / "b", 3, params0, lora=LORA)
    resumed = _run(tmp_path / "b", 5, params0, lora=LORA)
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)), jax.tree.leaves(weights)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    # Exports: the merged HF checkpoint and the peft adapter of the final weights.
    adapters = lora.Adapters(weights=weights, spec=lora.lora_config(LORA))
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % config.vocab_size
    want = np.asarray(transformer.forward(config, params0, tokens, lora=adapters))
    _, exported = hf.load_hf(str(tmp_path / "hf"))
    np.testing.assert_allclose(transformer.forward(config, exported, tokens), want, atol=1e-5,
                               rtol=0)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (
        4, 8, ["down_proj", "q_proj", "v_proj"])


def test_bfloat16_base_float32_adapters_and_optimizer(tmp_path):
    params0 = jax.device_get(transformer.init_params(tiny_config(), jax.random.key(1)))
    state = _run(tmp_path / "run", 2, params0, lora={**LORA, "base_dtype": "bfloat16"})
    assert {x.dtype for x in jax.tree.leaves(state.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    for a, b in zip(jax.tree.leaves(jax.device_get(state.ref_params)), jax.tree.leaves(params0)):
        np.testing.assert_array_equal(a, np.asarray(b).astype(jnp.bfloat16))


@pytest.mark.slow
def test_lora_resume_after_sigkill_equals_uninterrupted(tmp_path):
    import train_script
    ref = train_script.run(tmp_path / "ref", num_steps=8, save_every=100, lora=train_script.LORA)
    ref_weights = jax.device_get(ref.params)
    workdir = tmp_path / "run"
    proc = _spawn(workdir, 8, 2, 0.4, "lora")
    _wait_for(lambda: (workdir / "checkpoints" / "4").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (workdir / "checkpoints" / "8").exists()
    proc = _spawn(workdir, 8, 2, 0.0, "lora")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "FINAL_STEP 8" in out, out[-3000:]
    assert json.loads((workdir / "run_info.json").read_text())["resumed_from_step"] >= 4
    resumed = load_params(workdir / "checkpoints", step=8)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(resumed),
                            jax.tree.leaves(ref_weights)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=str(path))
    assert set(_metric_steps(workdir)) == set(range(1, 9))


@pytest.mark.slow
def test_lora_dpo_step_memory_below_full_dpo_for_1b():
    """Compiled on CPU from shapes alone (nothing runs): llama3_1b, one pair of 256 tokens."""
    config = get_config("llama3_1b", remat="full")
    tx, _ = make_optimizer(OptimizerConfig(), num_steps=10)
    loss = get_objective("dpo").bind(config=config, options={"beta": 0.1})
    shape = (1, 2, 256)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
    full = compiled_step_memory(config, loss, batch=batch, tx=tx, reference=True)
    spec = lora.LoraConfig(rank=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down"))
    adapted = compiled_step_memory(config, loss, batch=batch, tx=tx, lora=spec, reference=True)
    n = config.num_params
    # Full DPO holds params, reference, Adam's two moments: 16 bytes a parameter as arguments.
    assert full.argument_size_in_bytes >= 16 * n
    # LoRA holds the base once (4 bytes a parameter) plus small adapters and their moments.
    assert 4 * n <= adapted.argument_size_in_bytes < 4.2 * n

    def peak(m):
        return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                - m.alias_size_in_bytes)

    assert peak(adapted) < 0.5 * peak(full), (peak(adapted), peak(full))
