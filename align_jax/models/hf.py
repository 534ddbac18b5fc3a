"""Hugging Face checkpoints in and out: safetensors <-> params (config.json via hf_config).

Only safetensors are read: a `pytorch_model.bin` is a pickle, and unpickling runs code.
Tensors are read one at a time into preallocated stacked host buffers, so the peak host memory
is about one copy of the model in the target dtype. Which tensors a family's checkpoint holds
and how each maps onto our tree is the family table's business (`families`, `hf_layout`).
"""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from align_jax import sharding
from align_jax.models import transformer
from align_jax.models.checks import check_safetensors
from align_jax.models.config import ModelConfig
from align_jax.models.families import get_family
from align_jax.models.hf_config import config_from_hf, config_to_hf, token_id_from_hf
from align_jax.models.hf_layout import get_path, place, set_path
from align_jax.models.hf_tensors import save_hf, tensors
from align_jax.models.named import resolve_model_path

__all__ = ["config_from_hf", "config_to_hf", "load_hf", "save_hf"]

Params = dict[str, Any]
_CONFIG = "config.json"
_GENERATION_CONFIG = "generation_config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Buffers some checkpoints store next to the weights (RoPE frequencies, the causal masks of
# older GPT-2 and GPT-NeoX saves): recomputed from the config, never read.
_BUFFERS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", ".attention.bias",
            ".attention.masked_bias")

# --------------------------------------------------------------------------- load


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            out = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(out).__name__}")
    return out


def _shard_files(path: str) -> tuple[list[str], str]:
    """(safetensors files to read, the file that names them) for a checkpoint directory."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            shard = os.path.join(path, name)
            if not os.path.exists(shard):
                raise FileNotFoundError(f"{index} names shard {name!r}, which is missing")
            files.append(shard)
        return files, index
    single = os.path.join(path, _SINGLE)
    if os.path.exists(single):
        return [single], single
    bins = [n for n in os.listdir(path) if n.endswith(".bin")]
    if bins:
        raise ValueError(f"{path} holds only PyTorch pickles ({', '.join(sorted(bins))}); .bin "
                         "files are not read because unpickling can run code. Convert the "
                         "checkpoint to safetensors (save_pretrained(safe_serialization=True)).")
    raise FileNotFoundError(f"{path}: neither {_SINGLE} nor {_INDEX} found")


def load_hf(path: str, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
            rules: str = "fsdp") -> tuple[ModelConfig, Params]:
    """Loads a Hugging Face checkpoint directory (config.json + safetensors).

    bos/eos/pad ids come from generation_config.json where it sets them (that is what
    transformers' generate stops on), else from config.json.

    Args:
      path: the checkpoint directory, a .gguf file or a named default such as
        'smollm2-135m-instruct' (see models/named.py; converted once into a cache).
      dtype: dtype of the returned params, and the config's compute/param dtype.
      mesh: if given, each param is placed straight into its sharded layout (by `rules`), so
        a model larger than one device never lands on one device.
      rules: the sharding rule preset used with `mesh`.
    Returns:
      (config, params) with params a plain dict of jax arrays (see transformer.py).
    """
    path = resolve_model_path(path)
    config_file = os.path.join(path, _CONFIG)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{path} has no {_CONFIG}; is it a Hugging Face checkpoint?")
    config = config_from_hf(_read_json(config_file), source=config_file)
    name = jnp.dtype(dtype).name
    ids = {}
    generation_file = os.path.join(path, _GENERATION_CONFIG)
    if os.path.exists(generation_file):
        generation = _read_json(generation_file)
        ids = {k: token_id_from_hf(generation[k]) for k in _TOKEN_ID_KEYS
               if generation.get(k) is not None}
    config = dataclasses.replace(config, dtype=name, param_dtype=name, **ids)
    shardings = None
    if mesh is not None:
        shardings = sharding.tree_shardings(transformer.abstract_params(config), mesh, rules)
    return config, _load_tensors(config, path, shardings)


def _load_tensors(config: ModelConfig, path: str, shardings: Any) -> Params:
    files, named_by = _shard_files(path)
    wanted = {t.hf_key: t for t in tensors(config)}
    target = np.dtype(jnp.dtype(config.param_dtype))
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    found: dict[str, str] = {}
    for file in files:
        check_safetensors(file)
        try:
            _read_file(file, config, wanted, target, buffers, found)
        except SafetensorError as e:
            raise ValueError(f"{file}: unreadable safetensors file ({e})") from None
    missing = [k for k in wanted if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = (" (config.json says tie_word_embeddings=false)"
                if missing[0] == "lm_head.weight" else "")
        raise ValueError(f"{named_by}: missing tensor {missing[0]!r}{more}{hint}")
    params: Params = {}
    for key_path in list(buffers):
        # Hand each buffer to JAX and drop the host copy before the next one.
        host = buffers.pop(key_path)
        if shardings is None:
            value = jnp.asarray(host)
        else:
            value = jax.make_array_from_callback(host.shape, get_path(shardings, key_path),
                                                 lambda index, host=host: host[index])
        set_path(params, key_path, value)
        del host
    return params


def _read_file(file: str, config: ModelConfig, wanted: dict, target, buffers: dict,
               found: dict) -> None:
    """Reads the wanted tensors of one safetensors file into the stacked host buffers."""
    bare_prefix = get_family(config.family, source=file).bare_prefix
    with safe_open(file, framework="numpy") as st:
        for key in st.keys():
            shape = tuple(st.get_slice(key).get_shape())
            t = wanted.get(key)
            if t is None and bare_prefix:
                t = wanted.get(bare_prefix + key)
            if t is None:
                if key.endswith(_BUFFERS):
                    continue  # a buffer recomputed from the config
                if key == "lm_head.weight" and config.tie_embeddings:
                    # Some tied checkpoints store the (shared) head anyway.
                    if shape != (config.vocab_size, config.embed_dim):
                        raise ValueError(
                            f"{file}: tensor {key!r} has shape {shape}, expected "
                            f"{(config.vocab_size, config.embed_dim)}")
                    continue
                raise ValueError(f"{file}: unexpected tensor {key!r} (shape {shape}) for a "
                                 f"{config.family} model with this config.json")
            if shape != t.hf_shape:
                raise ValueError(f"{file}: tensor {key!r} has shape {shape}, expected "
                                 f"{t.hf_shape} from config.json")
            if t.hf_key in found:
                raise ValueError(f"{file}: tensor {key!r} also appears in {found[t.hf_key]}")
            found[t.hf_key] = file
            place(buffers, t, st.get_tensor(key), target)
