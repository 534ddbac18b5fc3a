"""Hugging Face config.json <-> ModelConfig, through the family table (`families.FAMILIES`).

Reads the transformers-5 keys and the older ones (see `hf_fields`); writes both, so old and
new readers see the same model. The storage dtype (`dtype` or `torch_dtype`) is not part of
ModelConfig: `load_hf`'s dtype argument decides the dtype we compute in.
"""

from collections.abc import Mapping
from typing import Any

from align_jax.models import hf_fields
from align_jax.models.config import ModelConfig
from align_jax.models.families import FAMILIES, get_family
from align_jax.models.hf_fields import token_id_from_hf

__all__ = ["config_from_hf", "config_to_hf", "token_id_from_hf"]


def config_from_hf(hf: Mapping, *, source: str = "config.json") -> ModelConfig:
    """Maps a Hugging Face config.json (transformers 4 or 5 keys) to a ModelConfig.

    Args:
      hf: the parsed config.json.
      source: where it came from, used in error messages.
    Returns:
      The ModelConfig (dtype and param_dtype float32; `load_hf` sets them).
    """
    if not isinstance(hf, Mapping):
        raise ValueError(f"{source}: expected a JSON object, found {type(hf).__name__}")
    family = get_family(hf_fields.get(hf, "model_type", source), source=source)
    fields = family.from_hf(hf, source)
    try:
        return ModelConfig(family=family.name, **{**family.fixed, **fields})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _check_exportable(config: ModelConfig) -> None:
    def fail(field, why):
        raise ValueError(f"ModelConfig.{field}={getattr(config, field)!r} cannot be written as "
                         f"a Hugging Face {config.family} model: {why}")

    if config.family not in FAMILIES:
        fail("family", f"supported families are {sorted(FAMILIES)}")
    family = FAMILIES[config.family]
    for field, value in family.fixed.items():
        if getattr(config, field) != value:
            fail(field, f"{family.name} models have {field}={value!r}")
    problem = family.check(config)
    if problem is not None:
        fail(*problem)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config.json for `config` (read by transformers 5 and older readers).

    Args:
      config: the model; fields Hugging Face cannot express raise ValueError.
    Returns:
      A JSON-serialisable dict.
    """
    _check_exportable(config)
    family = FAMILIES[config.family]
    return {
        "architectures": [family.architecture],
        "model_type": family.name,
        **family.to_hf(config),
        "initializer_range": config.init_std,
        **hf_fields.token_ids_to_hf(config),
        "use_cache": True,
        "dtype": config.param_dtype,
    }
