"""Tiny random Hugging Face reference models of each supported family (torch, float32).

Tests compare align_jax against these; nothing is downloaded.
"""

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "mixtral", "gpt2", "gpt_neox", "phi")

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
    # E = 4 experts, top 2; a wider init than 0.02 so routing is decisive (no near-ties
    # between experts that float32 rounding could flip).
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
        router_aux_loss_coef=0.02, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
# Families whose config.json names the shapes differently (no _COMMON keys).
_OWN_KEYS = {
    # Learned positions, fused c_attn, tied head, plain gelu_new MLP.
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=256,
        activation_function="gelu_new", bos_token_id=1, eos_token_id=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1)),
    # Partial rotary (half of each head), parallel residual with two norms, untied embed_out.
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5,
        rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu",
        initializer_range=0.1)),
    # Partial rotary, one shared norm for parallel attention and MLP, a biased head, GQA.
    "phi": (transformers.PhiConfig, transformers.PhiForCausalLM, dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        partial_rotary_factor=0.5, hidden_act="gelu_new", initializer_range=0.1)),
}


def tiny_hf_model(family: str, *, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random float32 model in eval mode; norm weights are randomised too."""
    if family in _OWN_KEYS:
        config_cls, model_cls, extra = _OWN_KEYS[family]
        config = config_cls(**{**extra, **overrides})
    else:
        config_cls, model_cls, extra = _FAMILY[family]
        config = config_cls(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init leaves norms at 1 (or 0 for Gemma) and biases at 0: randomise them so
            # a mapping that drops or swaps them cannot pass.
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_hf(family: str, path, *, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """Saves a tiny random model (safetensors) to `path` and returns it."""
    model = tiny_hf_model(family, seed=seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    return model
