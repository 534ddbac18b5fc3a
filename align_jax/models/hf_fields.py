"""Reading and writing single config.json fields, shared by the family descriptions.

Reads the transformers-5 RoPE key (`rope_parameters`) and the older ones (`rope_theta`,
`rope_scaling` with `type` or `rope_type`); `rope_to_hf` writes both, so old and new readers
see the same model.
"""

from collections.abc import Mapping
from typing import Any

from align_jax.models.checks import int_field
from align_jax.models.config import ModelConfig, RopeScaling

ACTIVATION_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                      "gelu_new": "gelu_tanh", "gelu": "gelu"}
ACTIVATION_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_SUPPORTED_ROPE = ("default", "linear", "llama3")
MISSING = object()


def get(hf: Mapping, key: str, source: str, default: Any = MISSING) -> Any:
    value = hf.get(key, default)
    if value is MISSING:
        raise ValueError(f"{source}: required key {key!r} is missing")
    return value


def integer(hf: Mapping, key: str, source: str, default: Any = MISSING) -> Any:
    """A required (or defaulted) integer field; a string or float names the field."""
    get(hf, key, source, default)  # a missing required key is named
    return int_field(hf, key, source, None if default is MISSING else default)


def token_id_from_hf(value: Any) -> int | tuple[int, ...] | None:
    """A bos/eos/pad id from JSON: a list (several eos ids) becomes a tuple."""
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return None if value is None else int(value)


def rope_from_hf(hf: Mapping, source: str, max_position: int, *, theta_key: str = "rope_theta",
                 partial_key: str = "partial_rotary_factor", default_partial: float = 1.0
                 ) -> tuple[float, RopeScaling | None, float]:
    """(theta, scaling, partial rotary fraction) from rope_parameters / rope_scaling / the
    top-level keys (`theta_key` and `partial_key` name a family's legacy top-level keys)."""
    key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
    rp = hf.get(key) or {}
    if not isinstance(rp, Mapping):
        raise ValueError(f"{source}: {key} must be an object, found {rp!r}")
    if rp and all(isinstance(v, Mapping) or v is None for v in rp.values()):
        raise ValueError(f"{source}: {key} is nested per layer type ({sorted(rp)}); only one "
                         "RoPE for all layers is supported")
    theta = float(rp.get("rope_theta", hf.get(theta_key, 10_000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    partial = rp.get("partial_rotary_factor", hf.get(partial_key, default_partial))
    partial = 1.0 if partial is None else float(partial)
    if kind == "default":
        return theta, None, partial
    where = f"{source} {key}"
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(get(rp, "factor", where))), partial
    if kind == "llama3":
        original = rp.get("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings", max_position))
        return theta, RopeScaling(
            kind="llama3", factor=float(get(rp, "factor", where)),
            low_freq_factor=float(get(rp, "low_freq_factor", where)),
            high_freq_factor=float(get(rp, "high_freq_factor", where)),
            original_max_position=int(original)), partial
    raise ValueError(f"{source}: {key}.rope_type={kind!r} is not supported "
                     f"(supported: {', '.join(_SUPPORTED_ROPE)})")


def rope_to_hf(config: ModelConfig, *, partial: bool = False) -> dict[str, Any]:
    """rope_parameters (transformers 5), rope_theta and, when scaled, rope_scaling (older
    readers); `partial` also writes partial_rotary_factor."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    s = config.rope_scaling
    if s is not None:
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position)
    if partial:
        rope["partial_rotary_factor"] = config.rope_fraction
    out: dict[str, Any] = {"rope_parameters": rope, "rope_theta": config.rope_theta}
    if s is not None:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def activation_from_hf(hf: Mapping, source: str, *, key: str = "hidden_act",
                       default: str = "silu") -> str:
    name = hf.get(key, default)
    if name not in ACTIVATION_FROM_HF:
        raise ValueError(f"{source}: {key}={name!r} is not supported "
                         f"(supported: {sorted(ACTIVATION_FROM_HF)})")
    return ACTIVATION_FROM_HF[name]


def token_ids_to_hf(config: ModelConfig) -> dict[str, Any]:
    eos = config.eos_token_id
    return {"bos_token_id": config.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "pad_token_id": config.pad_token_id}


def token_ids_from_hf(hf: Mapping) -> dict[str, Any]:
    return {f"{k}_token_id": token_id_from_hf(hf.get(f"{k}_token_id"))
            for k in ("bos", "eos", "pad")}
