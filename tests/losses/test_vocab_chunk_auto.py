"""The vocabulary is chunked by default above AUTO_CHUNK_ABOVE entries, with the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.losses import logprobs
from align_jax.models import transformer
from align_jax.models.config import get_config


def test_resolve_vocab_chunk():
    big = logprobs.AUTO_CHUNK_ABOVE + 1
    assert logprobs.resolve_vocab_chunk(big, 0) == logprobs.AUTO_CHUNK
    assert logprobs.resolve_vocab_chunk(512, 0) == 0
    assert logprobs.resolve_vocab_chunk(big, -1) == 0
    assert logprobs.resolve_vocab_chunk(512, 100) == 100


def test_default_chunked_equals_full_logits_values_and_grads():
    cfg = get_config("tiny", vocab_size=logprobs.AUTO_CHUNK_ABOVE + 5, num_layers=1)
    params = transformer.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tok = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    batch = {"tokens": tok[:, :-1], "targets": tok[:, 1:],
             "loss_mask": np.ones((2, 8), np.float32)}

    def total(p, chunk):
        lp, _ = logprobs.forward_token_logps(cfg, p, batch, vocab_chunk_size=chunk)
        return jnp.sum(lp), lp

    (auto, lp_auto), g_auto = jax.jit(jax.value_and_grad(total, has_aux=True),
                                      static_argnums=1)(params, 0)
    (full, lp_full), g_full = jax.jit(jax.value_and_grad(total, has_aux=True),
                                      static_argnums=1)(params, -1)
    np.testing.assert_allclose(lp_auto, lp_full, atol=2e-5)
    for a, b in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    # The default really took the chunked path: its jaxpr has no [B, T, V] float32 value.
    jaxpr = jax.make_jaxpr(lambda p: total(p, 0)[0])(params)
    assert f"f32[2,8,{cfg.vocab_size}]" not in str(jaxpr)
    assert f"f32[2,8,{cfg.vocab_size}]" in str(jax.make_jaxpr(lambda p: total(p, -1)[0])(params))
