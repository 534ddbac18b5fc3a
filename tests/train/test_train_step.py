"""The jitted step: accumulation equals full batch, sharded equals single device, one trace."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reduction_order import ADAM_EPS, trained_params_atol
from train_fixtures import make_batch, nll_loss, per_row_nll_loss, tiny_config

from align_jax import sharding
from align_jax.losses import objectives
from align_jax.models import transformer
from align_jax.train import compile as compile_lib
from align_jax.train import optim
from align_jax.train import state as state_lib
from align_jax.train import step as step_lib

CFG = tiny_config()
OPT = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, weight_decay=0.1)
# Sharded vs single device: an Adam eps that rounding cannot flip a step with (reduction_order).
SHARDED_OPT = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, weight_decay=0.1,
                                    eps=ADAM_EPS)


def _setup(mesh, rules, *, loss_fn=nll_loss, grad_accum=1, seed=0, opt=OPT):
    tx, schedule = optim.make_optimizer(opt, num_steps=10)
    abstract = state_lib.abstract_state(transformer.abstract_params(CFG), tx=tx)
    shardings = state_lib.train_state_shardings(abstract, mesh, rules)
    params = transformer.init_params(CFG, jax.random.key(seed), mesh=mesh, rules=rules)
    state = compile_lib.init_train_state(params, tx=tx, seed=seed, state_shardings=shardings)
    loss = objectives.as_objective(loss_fn).bind(config=CFG)
    step = compile_lib.jit_train_step(loss=loss, tx=tx, schedule=schedule, grad_accum=grad_accum,
                                      mesh=mesh, rules=rules, state_shardings=shardings)
    return state, step, shardings


def _put(batch, mesh, rules):
    return jax.device_put(batch, compile_lib.batch_shardings(mesh, rules))


def _one_device():
    return sharding.make_mesh(sharding.MeshSpec(data=1), devices=jax.devices()[:1])


def test_accumulated_gradients_equal_full_batch():
    params = transformer.init_params(CFG, jax.random.key(1))
    batch = jax.tree.map(jnp.asarray, make_batch(0, batch_size=8))
    loss = objectives.as_objective(per_row_nll_loss).bind(config=CFG)

    @functools.partial(jax.jit, static_argnames="grad_accum")
    def grads(params, batch, grad_accum):
        return step_lib.accumulate_gradients(loss, params, batch, rng=jax.random.key(0),
                                             grad_accum=grad_accum)

    full_loss, _, full = grads(params, batch, grad_accum=1)
    acc_loss, metrics, acc = grads(params, batch, grad_accum=4)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-6)
    for (path, a), f in zip(jax.tree_util.tree_leaves_with_path(acc), jax.tree.leaves(full)):
        assert a.dtype == jnp.float32
        scale = float(np.max(np.abs(f)))
        np.testing.assert_allclose(a, f, rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))
    # Microbatch metrics are means over microbatches of each one's max: never above the max.
    _, full_metrics, _ = grads(params, batch, grad_accum=1)
    assert float(metrics["row_nll_max"]) <= float(full_metrics["row_nll_max"]) + 1e-6


@pytest.mark.slow
def test_accumulated_step_equals_full_batch_step():
    mesh = _one_device()
    batch = make_batch(3, batch_size=8)
    out = {}
    # A larger Adam eps: with eps=1e-8 the first updates are ~lr * sign(g), which turns
    # float32 rounding in near-zero gradients into visible parameter differences.
    opt = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, weight_decay=0.1, eps=1e-4)
    for accum in (1, 4):
        state, step, _ = _setup(mesh, "dp", loss_fn=per_row_nll_loss, grad_accum=accum, opt=opt)
        for _ in range(2):
            state, metrics = step(state, _put(batch, mesh, "dp"))
        out[accum] = (jax.device_get(state.params), jax.device_get(metrics))
    for a, f in zip(jax.tree.leaves(out[4][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(a, f, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[4][1]["grad_norm"], out[1][1]["grad_norm"], rtol=1e-5)


@pytest.fixture(scope="module")
def single_device_run():
    mesh = _one_device()
    state, step, _ = _setup(mesh, "dp", grad_accum=2, opt=SHARDED_OPT)
    for i in range(2):
        state, metrics = step(state, _put(make_batch(i), mesh, "dp"))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("rules", [pytest.param("dp", marks=pytest.mark.slow),
                                   pytest.param("fsdp", marks=pytest.mark.slow), "fsdp_tp"])
def test_sharded_step_equals_single_device(single_device_run, rules):
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    state, step, shardings = _setup(mesh, rules, grad_accum=2, opt=SHARDED_OPT)
    for i in range(2):
        state, metrics = step(state, _put(make_batch(i), mesh, rules))
    # The state stays in its planned layout (the out_shardings), step after step.
    got = jax.tree.map(lambda x: x.sharding.spec, state.params)
    want = jax.tree.map(lambda s: s.spec, shardings.params)
    assert got == want
    if rules != "dp":
        assert any("fsdp" in jax.tree.leaves(tuple(s)) for s in jax.tree.leaves(
            want, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    ref_params, ref_metrics = single_device_run
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)),
                            jax.tree.leaves(ref_params)):
        # Another reduction order across the mesh: the bound of reduction_order.
        np.testing.assert_allclose(a, b, rtol=0, err_msg=str(path), atol=trained_params_atol(
            learning_rate=SHARDED_OPT.learning_rate, num_steps=2))
    for k in ("loss", "grad_norm", "update_norm", "param_norm"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)


def test_opt_state_shares_param_shardings():
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    tx, _ = optim.make_optimizer(OPT, num_steps=10)
    abstract = state_lib.abstract_state(transformer.abstract_params(CFG), tx=tx, with_ref=True)
    shardings = state_lib.train_state_shardings(abstract, mesh, "fsdp_tp")
    adam = shardings.opt_state[1]  # chain: clip, adam, decay, lr
    assert isinstance(adam, optax.ScaleByAdamState)
    assert adam.mu == shardings.params and adam.nu == shardings.params
    assert shardings.ref_params == shardings.params
    assert shardings.params["layers"]["mlp"]["gate"].spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")
    # Adafactor's factored moments lose rank: they fall back to replicated, without error.
    tx, _ = optim.make_optimizer(optim.OptimizerConfig(name="adafactor"), num_steps=10)
    big = tiny_config(embed_dim=256, mlp_dim=512, num_heads=4, head_dim=64)
    abstract = state_lib.abstract_state(transformer.abstract_params(big), tx=tx)
    shardings = state_lib.train_state_shardings(abstract, mesh, "fsdp")
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    assert jax.sharding.PartitionSpec() in specs


def test_step_traces_once_and_draws_fold_in_randomness():
    traces = []

    def loss_fn(params, batch, *, config, rng, ref_params):
        traces.append(1)
        loss, metrics = nll_loss(params, batch, config=config)
        return loss, {**metrics, "u": jax.random.uniform(rng)}

    mesh = sharding.make_mesh(sharding.MeshSpec(data=4, fsdp=2))
    state, step, _ = _setup(mesh, "fsdp", loss_fn=loss_fn, seed=7)
    tx, schedule = optim.make_optimizer(OPT, num_steps=10)
    us, lrs = [], []
    for i in range(3):
        state, metrics = step(state, _put(make_batch(i), mesh, "fsdp"))
        us.append(float(metrics["u"]))
        lrs.append(float(metrics["learning_rate"]))
    assert len(traces) == 1
    assert step.jitted._cache_size() == 1
    assert int(state.step) == 3
    # Microbatch 0 of step s draws from fold_in(fold_in(key(seed), s), 0).
    want = [float(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(
        jax.random.key(7), s), 0))) for s in range(3)]
    np.testing.assert_allclose(us, want, rtol=1e-6)
    np.testing.assert_allclose(lrs, [float(schedule(s)) for s in range(3)], rtol=1e-6)
    # A new batch shape is a new trace: the counter above can fail.
    state, _ = step(state, _put(make_batch(0, batch_size=16), mesh, "fsdp"))
    assert len(traces) == 2


@pytest.mark.slow
def test_bf16_compute_with_remat_keeps_float32_master_params():
    cfg16 = tiny_config(dtype="bfloat16", remat="full")
    params = transformer.init_params(CFG, jax.random.key(2))
    batch = jax.tree.map(jnp.asarray, make_batch(5))
    tx, schedule = optim.make_optimizer(OPT, num_steps=10)
    out = {}
    for name, cfg in (("f32", CFG), ("bf16", cfg16)):
        state = state_lib.init_state(jax.tree.map(jnp.copy, params), tx=tx, seed=0)
        step = jax.jit(functools.partial(
            step_lib.train_step, loss=objectives.as_objective(nll_loss).bind(config=cfg), tx=tx,
            schedule=schedule, grad_accum=2))
        state, metrics = step(state, batch)
        state, metrics = step(state, batch)
        out[name] = (state, metrics)
    state, metrics = out["bf16"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    ref = out["f32"][1]
    # bf16 matmuls: the same step within bf16 rounding, not bit for bit.
    np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=2e-2)
    np.testing.assert_allclose(metrics["grad_norm"], ref["grad_norm"], rtol=1e-1)
    assert float(metrics["loss"]) != float(ref["loss"])


def test_objective_bind_passes_config_rng_reference_and_checks_options():
    params = transformer.init_params(CFG, jax.random.key(4))
    batch = jax.tree.map(jnp.asarray, make_batch(2))
    key = jax.random.key(0)
    no_ref = objectives.Objective(name="nll", loss=nll_loss)
    ours = no_ref.bind(config=CFG)
    with pytest.raises(TypeError, match="ref_params"):
        ours(params, batch, rng=key, ref_params=params)
    seen = {}

    def loss_fn(params, batch, *, config, scale, rng, ref_params):
        seen.update(config=config, scale=scale, rng=rng, ref=ref_params)
        return nll_loss(params, batch, config=config)

    scaled = objectives.Objective(name="scaled", loss=loss_fn, options=("scale",),
                                  references=("params",))
    bound = scaled.bind(config=CFG, options={"scale": 2.0})
    bound(params, batch, rng=key, ref_params=params)
    assert seen["config"] is CFG and seen["scale"] == 2.0
    assert seen["rng"] is key and seen["ref"] is params
    with pytest.raises(ValueError, match="objective 'scaled': unknown loss keyword 'scal'"):
        scaled.bind(config=CFG, options={"scal": 2.0})
    # The registered objectives plug in the same way.
    theirs = objectives.get_objective("sft").bind(config=CFG)
    want, _ = jax.jit(lambda p, b: ours(p, b, rng=key, ref_params=None))(params, batch)
    got, _ = jax.jit(lambda p, b: theirs(p, b, rng=key, ref_params=None))(params, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_token_mean_loss_accumulates_to_the_full_batch_with_uneven_masks():
    params = transformer.init_params(CFG, jax.random.key(2))
    batch = make_batch(1, batch_size=8)
    # Rows score very different numbers of tokens: equal microbatch weights would be wrong.
    batch["loss_mask"][:4, 3:] = 0.0
    batch = jax.tree.map(jnp.asarray, batch)
    loss = objectives.get_objective("sft").bind(config=CFG)

    @functools.partial(jax.jit, static_argnames="grad_accum")
    def grads(params, batch, grad_accum):
        return step_lib.accumulate_gradients(loss, params, batch, rng=jax.random.key(0),
                                             grad_accum=grad_accum)

    full_loss, full_metrics, full = grads(params, batch, grad_accum=1)
    acc_loss, metrics, acc = grads(params, batch, grad_accum=4)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["num_tokens"], full_metrics["num_tokens"])
    for a, f in zip(jax.tree.leaves(acc), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, f, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(f))))
