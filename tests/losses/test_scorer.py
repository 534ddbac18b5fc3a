"""The batched scorer: order kept, bucketing exact, sharded over 8 devices == one device."""

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import sharding
from align_jax.data import batching
from align_jax.data.formatting import Example
from align_jax.losses.logprobs import forward_token_logps
from align_jax.losses.scorer import _bucket, bind, score_examples
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


def test_buckets_are_half_octaves_and_pad_at_most_a_third():
    got = {n: _bucket(n, seq_len=512, min_bucket=16) for n in (1, 16, 17, 24, 25, 33, 48, 49,
                                                                 96, 97, 300, 400, 600)}
    assert got == {1: 16, 16: 16, 17: 24, 24: 24, 25: 32, 33: 48, 48: 48, 49: 64, 96: 96,
                   97: 128, 300: 384, 400: 512, 600: 512}
    for n in range(16, 513):
        b = _bucket(n, seq_len=512, min_bucket=16)
        assert n <= b < 1.5 * n and (b & (b - 1) == 0 or (b // 3) & (b // 3 - 1) == 0)


def _compiles(fn):
    """How many XLA compilations `fn()` triggers."""
    box = {"on": True, "n": 0}

    def listener(event, duration, **_):
        if box["on"] and event == "/jax/core/compile/backend_compile_duration":
            box["n"] += 1
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        box["on"] = False
    return box["n"]


def _masked_mean(config, params, batch):
    """A cheap score_fn with a config bound in: compiles fast, computes something checkable."""
    w = params["w"] * config.embed_dim
    return (batch["loss_mask"] * w).sum(-1, keepdims=True) / config.embed_dim


def test_a_bound_score_fn_compiles_once_for_every_call_and_equal_config():
    """Evaluation scores several models in several calls: one compilation per shape."""
    rng = np.random.default_rng(1)
    examples = [Example(prompt=rng.integers(3, CFG.vocab_size, size=5).astype(np.int32),
                        completions=(rng.integers(3, CFG.vocab_size, size=k).astype(np.int32),))
                for k in (7, 2, 4)]
    kw = dict(examples=examples, build=_build, seq_len=64, batch_size=4)
    params = [{"w": np.float32(k)} for k in (1, 2)]
    scores = []
    first = _compiles(lambda: scores.append(score_examples(bind(_masked_mean, CFG), params[0],
                                                           **kw)))
    assert bind(_masked_mean, CFG) is bind(_masked_mean, CFG)
    # Another model with an equal config, another call: nothing compiles again.
    again = _compiles(lambda: scores.append(score_examples(
        bind(_masked_mean, get_config("tiny")), params[1], **kw)))
    # A closure made per call (what bind replaces) compiles every time.
    fresh = _compiles(lambda: score_examples(lambda p, b: _masked_mean(CFG, p, b), params[1],
                                             **kw))
    assert first >= 1 and again == 0 and fresh >= 1
    np.testing.assert_allclose(scores[0][:, 0], [7, 2, 4])
    np.testing.assert_allclose(scores[1][:, 0], [14, 4, 8])
