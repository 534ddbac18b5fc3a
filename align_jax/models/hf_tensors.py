"""`save_hf`, and the tensor list of a config (`tensors`, from the family table).

Shared by `hf` (safetensors in) and `gguf` (llama.cpp files in, written out as safetensors);
kept apart from `hf.load_hf` so that the name resolver (`named`), which `load_hf` calls and
which converts GGUF files with `save_hf`, forms no import cycle. Layouts: `hf_layout`.
"""

import json
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from align_jax.atomic import default_mode
from align_jax.models.config import ModelConfig
from align_jax.models.families import get_family
from align_jax.models.hf_config import config_to_hf
from align_jax.models.hf_layout import Tensor, get_path, to_hf

__all__ = ["save_hf", "tensors"]

Params = dict[str, Any]
_CONFIG = "config.json"
_GENERATION_CONFIG = "generation_config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def tensors(config: ModelConfig) -> list[Tensor]:
    """Every tensor of the config's checkpoint, in the order transformers writes them."""
    return get_family(config.family, source=f"ModelConfig.family={config.family!r}").tensors(
        config)


# --------------------------------------------------------------------------- save


def save_hf(config: ModelConfig, params: Params, path: str, *,
            max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> None:
    """Writes a checkpoint directory that transformers' AutoModelForCausalLM loads.

    Writes config.json, generation_config.json and model.safetensors, or numbered shards plus
    model.safetensors.index.json when the tensors exceed `max_shard_bytes`. Safetensors files
    left in `path` by an earlier save are removed first so that the two cannot mix.

    Args:
      config: the model.
      params: its parameter tree (plain or boxed), any dtype; tensors keep that dtype.
      path: output directory (created if needed).
      max_shard_bytes: the largest shard; a tensor larger than this gets a shard of its own.
      tokenizer: an `align_jax.tokenizer.Tokenizer` whose files are written too, so that
        transformers' AutoTokenizer loads `path` as well.
    """
    path = os.fspath(path)
    hf_config = config_to_hf(config)
    params = nn.unbox(params)
    listed = tensors(config)
    sizes, dtypes = [], set()
    for t in listed:
        for g in t.targets:
            leaf = get_path(params, g.path)
            if tuple(leaf.shape) != g.full_shape:
                raise ValueError(f"params {'/'.join(g.path)} has shape {tuple(leaf.shape)}, "
                                 f"expected {g.full_shape} from the config")
            dtypes.add(jnp.dtype(leaf.dtype).name)
        sizes.append(math.prod(t.hf_shape) * jnp.dtype(leaf.dtype).itemsize)
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size

    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name in (_SINGLE, _INDEX) or _SHARD.fullmatch(name):
            os.remove(os.path.join(path, name))
    names = ([_SINGLE] if len(shards) == 1 else
             [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))])
    weight_map = {}
    for name, members in zip(names, shards):
        arrays = {}
        for i in members:
            t = listed[i]
            arrays[t.hf_key] = to_hf([np.asarray(jax.device_get(
                get_path(params, g.path)[g.index])) for g in t.targets], t)
            weight_map[t.hf_key] = name
        save_file(arrays, os.path.join(path, name), metadata={"format": "pt"})
        default_mode(os.path.join(path, name))
        del arrays
    if len(shards) > 1:
        with open(os.path.join(path, _INDEX), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, fh,
                      indent=2)

    if len(dtypes) == 1:
        hf_config["dtype"] = dtypes.pop()
    _write_json(os.path.join(path, _CONFIG), hf_config)
    generation = {k: hf_config[k] for k in _TOKEN_ID_KEYS if hf_config[k] is not None}
    _write_json(os.path.join(path, _GENERATION_CONFIG), generation)
    if tokenizer is not None:
        tokenizer.save(path)


def _write_json(file: str, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
