"""Hugging Face config.json <-> ModelConfig, for the four supported families.

Reads the transformers-5 RoPE key (`rope_parameters`) and the older ones (`rope_theta`,
`rope_scaling` with `type` or `rope_type`); writes both, so old and new readers see the same
model. The storage dtype (`dtype` or `torch_dtype`) is not part of ModelConfig: `load_hf`'s
dtype argument decides the dtype we compute in.
"""

import math
from collections.abc import Mapping
from typing import Any

from align_jax.models.checks import int_field
from align_jax.models.config import ModelConfig, RopeScaling

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}
_ACTIVATION_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                       "gelu_new": "gelu_tanh", "gelu": "gelu"}
_ACTIVATION_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_SUPPORTED_ROPE = ("default", "linear", "llama3")
_MISSING = object()


def _get(hf: Mapping, key: str, source: str, default: Any = _MISSING) -> Any:
    value = hf.get(key, default)
    if value is _MISSING:
        raise ValueError(f"{source}: required key {key!r} is missing")
    return value


def _int(hf: Mapping, key: str, source: str, default: Any = _MISSING) -> Any:
    """A required (or defaulted) integer field; a string or float names the field."""
    _get(hf, key, source, default)  # a missing required key is named
    return int_field(hf, key, source, None if default is _MISSING else default)


def _rope_from_hf(hf: Mapping, source: str, max_position: int) -> tuple[float, RopeScaling | None]:
    key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
    rp = hf.get(key) or {}
    if not isinstance(rp, Mapping):
        raise ValueError(f"{source}: {key} must be an object, found {rp!r}")
    if rp and all(isinstance(v, Mapping) or v is None for v in rp.values()):
        raise ValueError(f"{source}: {key} is nested per layer type ({sorted(rp)}); only one "
                         "RoPE for all layers is supported")
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{source}: partial_rotary_factor={partial!r} is not supported")
    if kind == "default":
        return theta, None
    where = f"{source} {key}"
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(_get(rp, "factor", where)))
    if kind == "llama3":
        original = rp.get("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings", max_position))
        return theta, RopeScaling(
            kind="llama3", factor=float(_get(rp, "factor", where)),
            low_freq_factor=float(_get(rp, "low_freq_factor", where)),
            high_freq_factor=float(_get(rp, "high_freq_factor", where)),
            original_max_position=int(original))
    raise ValueError(f"{source}: {key}.rope_type={kind!r} is not supported "
                     f"(supported: {', '.join(_SUPPORTED_ROPE)})")


def _activation_from_hf(hf: Mapping, family: str, source: str) -> str:
    key = "hidden_act"
    if family == "gemma" and hf.get("hidden_activation") is not None:
        key = "hidden_activation"
    name = hf.get(key, "gelu_pytorch_tanh" if family == "gemma" else "silu")
    if family == "gemma" and name == "gelu":
        # Gemma's original configs say "gelu" but the weights were trained with the tanh
        # approximation; transformers makes the same substitution.
        name = "gelu_pytorch_tanh"
    if name not in _ACTIVATION_FROM_HF:
        raise ValueError(f"{source}: {key}={name!r} is not supported "
                         f"(supported: {sorted(_ACTIVATION_FROM_HF)})")
    return _ACTIVATION_FROM_HF[name]


def _qwen2_window(hf: Mapping, num_layers: int, source: str) -> int | None:
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", False) or window is None:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        start = hf.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= start else "full_attention"
                       for i in range(num_layers)]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return int(window)
    raise ValueError(f"{source}: layer_types mixes sliding and full attention "
                     f"({layer_types}); one kind for all layers is supported")


def token_id_from_hf(value: Any) -> int | tuple[int, ...] | None:
    """A bos/eos/pad id from JSON: a list (several eos ids) becomes a tuple."""
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return None if value is None else int(value)


def config_from_hf(hf: Mapping, *, source: str = "config.json") -> ModelConfig:
    """Maps a Hugging Face config.json (transformers 4 or 5 keys) to a ModelConfig.

    Args:
      hf: the parsed config.json.
      source: where it came from, used in error messages.
    Returns:
      The ModelConfig (dtype and param_dtype float32; `load_hf` sets them).
    """
    family = _get(hf, "model_type", source)
    if family not in _ARCHITECTURES:
        raise ValueError(f"{source}: model_type={family!r} is not supported "
                         f"(supported: {sorted(_ARCHITECTURES)})")
    if not isinstance(hf, Mapping):
        raise ValueError(f"{source}: expected a JSON object, found {type(hf).__name__}")
    embed_dim = _int(hf, "hidden_size", source)
    num_heads = _int(hf, "num_attention_heads", source)
    num_kv_heads = _int(hf, "num_key_value_heads", source, None)
    head_dim = _int(hf, "head_dim", source, None)
    max_position = _int(hf, "max_position_embeddings", source, 8192)
    rope_theta, rope_scaling = _rope_from_hf(hf, source, max_position)
    num_layers = _int(hf, "num_hidden_layers", source)
    attention_bias = bool(hf.get("attention_bias", False))
    bias = {
        "llama": dict(qkv_bias=attention_bias, out_bias=attention_bias,
                      mlp_bias=bool(hf.get("mlp_bias", False))),
        "mistral": dict(),
        "qwen2": dict(qkv_bias=True),
        "gemma": dict(qkv_bias=attention_bias, out_bias=attention_bias),
    }[family]
    window = {"mistral": hf.get("sliding_window"),
              "qwen2": _qwen2_window(hf, num_layers, source)}.get(family)
    gemma = family == "gemma"
    try:
        return ModelConfig(
            family=family,
            vocab_size=_int(hf, "vocab_size", source),
            embed_dim=embed_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(num_kv_heads if num_kv_heads is not None else num_heads),
            head_dim=int(head_dim if head_dim is not None else embed_dim // num_heads),
            mlp_dim=_int(hf, "intermediate_size", source),
            activation=_activation_from_hf(hf, family, source),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            norm_offset=1.0 if gemma else 0.0,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            scale_embeddings=gemma,
            sliding_window=None if window is None else int(window),
            max_position=max_position,
            bos_token_id=token_id_from_hf(hf.get("bos_token_id")),
            eos_token_id=token_id_from_hf(hf.get("eos_token_id")),
            pad_token_id=token_id_from_hf(hf.get("pad_token_id")),
            init_std=float(hf.get("initializer_range", 0.02)),
            **bias,
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _check_exportable(config: ModelConfig) -> None:
    def fail(field, why):
        raise ValueError(f"ModelConfig.{field}={getattr(config, field)!r} cannot be written as "
                         f"a Hugging Face {config.family} model: {why}")

    family = config.family
    if family not in _ARCHITECTURES:
        fail("family", f"supported families are {sorted(_ARCHITECTURES)}")
    if config.query_scale is not None and not math.isclose(config.query_scale,
                                                          config.head_dim ** -0.5):
        fail("query_scale", "transformers scales queries by head_dim ** -0.5")
    gemma = family == "gemma"
    if config.norm_offset != (1.0 if gemma else 0.0):
        fail("norm_offset", "Gemma norms are (1 + w), the others w")
    if config.scale_embeddings != gemma:
        fail("scale_embeddings", "only Gemma scales embeddings by sqrt(embed_dim)")
    if gemma and config.activation == "gelu":
        fail("activation", "transformers runs Gemma's 'gelu' as the tanh approximation")
    if config.mlp_bias and family != "llama":
        fail("mlp_bias", "only Llama configs have mlp_bias")
    if family in ("llama", "gemma") and config.qkv_bias != config.out_bias:
        fail("out_bias", "attention_bias sets q, k, v and o biases together")
    if family == "mistral" and (config.qkv_bias or config.out_bias):
        fail("qkv_bias", "Mistral attention has no biases")
    if family == "qwen2" and not (config.qkv_bias and not config.out_bias):
        fail("qkv_bias", "Qwen2 has q, k, v biases and no o bias")
    if config.sliding_window is not None and family in ("llama", "gemma"):
        fail("sliding_window", "this family has no sliding window")


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config.json for `config` (read by transformers 5 and older readers).

    Args:
      config: the model; fields Hugging Face cannot express raise ValueError.
    Returns:
      A JSON-serialisable dict.
    """
    _check_exportable(config)
    family = config.family
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    s = config.rope_scaling
    if s is not None:
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position)
    eos = config.eos_token_id
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": _ACTIVATION_TO_HF[config.activation],
        "max_position_embeddings": config.max_position,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; older readers read rope_theta / rope_scaling.
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": config.param_dtype,
    }
    if s is not None:
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if family == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif family == "mistral":
        hf.update(sliding_window=config.sliding_window)
    elif family == "qwen2":
        window = config.sliding_window is not None
        hf.update(use_sliding_window=window, sliding_window=config.sliding_window,
                  max_window_layers=0 if window else config.num_layers,
                  layer_types=[("sliding" if window else "full") + "_attention"] *
                  config.num_layers)
    else:
        hf.update(attention_bias=config.qkv_bias, hidden_activation=hf["hidden_act"])
    return hf
