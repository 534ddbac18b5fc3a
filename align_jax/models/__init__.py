"""Decoder models (Llama, Mistral, Qwen2, Gemma, Mixtral, GPT-2, GPT-NeoX, Phi): config and
presets, the pure forward, Hugging Face checkpoints in and out, GGUF files in."""

from align_jax.models.config import PRESETS, ModelConfig, RopeScaling, get_config
from align_jax.models.gguf import load_gguf
from align_jax.models.hf import config_from_hf, config_to_hf, load_hf, save_hf
from align_jax.models.transformer import (
    abstract_params,
    forward,
    forward_hidden,
    forward_with_aux,
    forward_with_cache,
    init_cache,
    init_params,
    jit_forward,
    param_count,
)

__all__ = [
    "PRESETS", "ModelConfig", "RopeScaling", "abstract_params", "config_from_hf", "config_to_hf",
    "forward", "forward_hidden", "forward_with_aux", "forward_with_cache", "get_config",
    "init_cache", "init_params", "jit_forward", "load_gguf", "load_hf", "param_count", "save_hf",
]
