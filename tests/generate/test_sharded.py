"""Generation on 8 (fake) devices under each sharding preset equals single-device generation."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from align_jax import sharding
from align_jax.generate import batch_inputs, generate, loop, prompt_batches, sampling
from align_jax.models import transformer
from align_jax.models.config import ModelConfig

# Every sharded dimension divides its mesh axes: embed 32 over fsdp=2, heads/kv heads/mlp/vocab
# over tensor=2, batch 8 over data x fsdp = 4.
CONFIG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, max_position=64, init_std=0.3, eos_token_id=None)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [3], [20, 21, 22, 23, 24],
           [30, 31], [40, 41, 42, 43, 44, 45]]


@pytest.fixture(scope="module")
def single():
    params = transformer.init_params(CONFIG, jax.random.key(0))
    return params, generate(CONFIG, params, PROMPTS, max_new_tokens=8, batch_size=8)


@pytest.mark.parametrize("rules", ["dp", "fsdp", "fsdp_tp"])
def test_sharded_greedy_equals_single_device(single, rules):
    assert len(jax.devices()) == 8
    params, expected = single
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    sharded_params = transformer.init_params(CONFIG, jax.random.key(0), mesh=mesh, rules=rules)
    out = generate(CONFIG, sharded_params, PROMPTS, max_new_tokens=8, batch_size=8, mesh=mesh,
                   rules=rules)
    assert out.tokens == expected.tokens
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs),
                               atol=1e-4)
    # Unsharded params are placed on the mesh by generate itself.
    again = generate(CONFIG, params, PROMPTS, max_new_tokens=8, batch_size=8, mesh=mesh,
                     rules=rules)
    assert again.tokens == expected.tokens


def test_cache_and_batch_are_sharded_under_fsdp_tp():
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    params = transformer.init_params(CONFIG, jax.random.key(0), mesh=mesh, rules="fsdp_tp")
    (batch,) = prompt_batches.plan_batches(PROMPTS, batch_size=8, cap=32)
    sampler, flags = sampling.make_sampling(8)
    arrays = batch_inputs.place((batch.tokens_BT, batch.positions_BT, batch.segment_ids_BT,
                          batch.active_B, sampler), mesh, "fsdp_tp")
    stop_ids = jax.device_put(np.full((8,), -1, np.int32), sharding.replicated(mesh))
    with sharding.use_mesh(mesh, "fsdp_tp"):
        state = loop.jit_prefill(params, *arrays, stop_ids, config=CONFIG, flags=flags,
                                 max_new_tokens=4, cache_len=batch.tokens_BT.shape[1] + 3,
                                 mesh=mesh, rules="fsdp_tp")
    batch_axes = ("data", "fsdp")
    assert state.cache["k"].sharding.spec == P(None, batch_axes, None, "tensor")
    assert state.cache["segment_ids"].sharding.spec == P(batch_axes)
    assert state.tokens_BM.sharding.spec == P(batch_axes)
