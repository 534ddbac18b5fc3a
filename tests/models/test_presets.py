"""Full-size presets, checked by shape only (jax.eval_shape allocates nothing)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import transformers

from align_jax.models import hf, transformer
from align_jax.models.config import PRESETS

# Parameter counts published with the Hugging Face checkpoints (safetensors metadata).
PUBLISHED = {
    "llama3_1b": 1_235_814_400,    # Llama-3.2-1B
    "llama3_8b": 8_030_261_248,    # Llama-3.1-8B
    "llama3_70b": 70_553_706_496,  # Llama-3.1-70B
    "mistral_7b": 7_241_732_096,   # Mistral-7B-v0.1
    "qwen2_0_5b": 494_032_768,     # Qwen2-0.5B
    "qwen2_7b": 7_615_616_512,     # Qwen2-7B
    "gemma_2b": 2_506_172_416,     # gemma-2b
    "gemma_7b": 8_537_680_896,     # gemma-7b
    "mixtral_8x7b": 46_702_792_704,  # Mixtral-8x7B-v0.1
    "gpt2_large": 774_030_080,     # gpt2-large
    "pythia_1_4b": 1_414_647_808,  # pythia-1.4b
    "phi_2": 2_779_683_840,        # phi-2
    # RedPajama-INCITE-Base-3B-v1 ships PyTorch pickles only: counted from its config.json.
    "redpajama_incite_3b": 2_775_864_320,
}
# Made-up sizes for tests and benchmarks: no published model to compare with.
NOT_REAL = {"tiny", "small_20m"}


def test_every_real_preset_has_a_published_count():
    assert set(PRESETS) - NOT_REAL == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published(name):
    config = PRESETS[name]
    count = transformer.param_count(transformer.abstract_params(config))
    assert abs(count - PUBLISHED[name]) <= 0.005 * PUBLISHED[name], (name, count)
    assert count == config.num_params


@pytest.mark.parametrize("name", ["llama3_8b", "llama3_70b"])
def test_forward_shape_without_allocating(name):
    config = PRESETS[name]
    params = nn.unbox(transformer.abstract_params(config))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    logits = jax.eval_shape(lambda p, t: transformer.forward(config, p, t), params, tokens)
    assert logits.shape == (2, 16, config.vocab_size) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    config = PRESETS[name]
    written = json.loads(json.dumps(hf.config_to_hf(config)))
    assert hf.config_from_hf(written) == config
    # transformers reads the same model out of it (its own defaults filled in).
    parsed = transformers.AutoConfig.for_model(**written).to_dict()
    assert hf.config_from_hf(parsed) == config
