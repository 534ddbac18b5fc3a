"""Tiny random Hugging Face reference models of each supported family (torch, float32).

Tests compare align_jax against these; nothing is downloaded.
"""

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "gemma")

_COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-6)

_FAMILY = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        tie_word_embeddings=False)),
    # A window shorter than the test sequences, so the sliding window matters.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        sliding_window=5, tie_word_embeddings=False, head_dim=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # head_dim != hidden / heads, one kv head, tied, GeGLU, (1 + w) norms, scaled embeddings.
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(
        head_dim=16, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh")),
}


def tiny_hf_model(family: str, *, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random float32 model in eval mode; norm weights are randomised too."""
    config_cls, model_cls, extra = _FAMILY[family]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init leaves norms at 1 (or 0 for Gemma) and biases at 0: randomise them so
            # a mapping that drops or swaps them cannot pass.
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_hf(family: str, path, *, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """Saves a tiny random model (safetensors) to `path` and returns it."""
    model = tiny_hf_model(family, seed=seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    return model
