"""The batched scorer: order kept, bucketing exact, sharded over 8 devices == one device."""

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import sharding
from align_jax.data import batching
from align_jax.data.formatting import Example
from align_jax.losses.logprobs import forward_token_logps
from align_jax.losses.scorer import score_examples
from align_jax.models import transformer
from align_jax.models.config import get_config

CFG = get_config("tiny")


def _sums(params, batch):
    logps, mask = forward_token_logps(CFG, params, batch, where="test")
    return jnp.stack([logps.sum(-1), mask.sum(-1)], axis=-1)


def _build(examples, **kw):
    return batching.pad_batch([batching.sequence(e.prompt, e.completions[0]) for e in examples],
                              **kw)


def test_sharded_bucketed_scores_equal_one_device_one_at_a_time():
    rng = np.random.default_rng(0)
    examples = [Example(prompt=rng.integers(3, CFG.vocab_size, size=int(p)).astype(np.int32),
                        completions=(rng.integers(3, CFG.vocab_size, size=int(c))
                                     .astype(np.int32),))
                for p, c in zip(rng.integers(1, 20, size=11), rng.integers(1, 40, size=11))]
    params = transformer.init_params(CFG, jax.random.key(0))
    # Independent: each example alone in a full-length row, no bucketing, no mesh.
    one = jax.jit(_sums)
    want = np.stack([np.asarray(one(params, _build([e], batch_size=1, seq_len=64)))[0]
                     for e in examples])
    single = score_examples(_sums, params, examples, build=_build, seq_len=64, batch_size=4)
    mesh = sharding.make_mesh(sharding.MeshSpec(data=8))
    sharded = score_examples(_sums, params, examples, build=_build, seq_len=64, batch_size=4,
                             mesh=mesh, rules="dp")
    assert single.shape == sharded.shape == (11, 2)
    np.testing.assert_array_equal(single[:, 1], [len(e.completions[0]) for e in examples])
    np.testing.assert_allclose(single, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-4)
