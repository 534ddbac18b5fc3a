"""NaN weights: generation is an error, not empty completions."""

import jax
import jax.numpy as jnp
import pytest

from align_jax.generate import generate
from align_jax.models import get_config, init_params


def test_nan_weights_raise_instead_of_empty_completions():
    config = get_config("tiny", num_layers=1, vocab_size=64)
    params = init_params(config, jax.random.key(0))
    good = generate(config, params, [[1, 2, 3]], max_new_tokens=3)
    assert len(good.tokens[0]) == 3
    params["final_norm"]["scale"] = jnp.full_like(params["final_norm"]["scale"], jnp.nan)
    with pytest.raises(FloatingPointError, match="non-finite logits for prompt 0"):
        generate(config, params, [[1, 2, 3]], max_new_tokens=3)
