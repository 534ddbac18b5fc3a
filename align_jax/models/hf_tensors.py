"""The tensor map between Hugging Face checkpoints and our param tree, and `save_hf`.

Shared by `hf` (safetensors in) and `gguf` (llama.cpp files in, written out as safetensors);
kept apart from `hf.load_hf` so that the name resolver (`named`), which `load_hf` calls and
which converts GGUF files with `save_hf`, forms no import cycle.


Layouts (torch Linear stores [out, in]; we store [in, out] with the heads split out):
  q/k/v_proj.weight [N*H, D]  -> {q,k,v}_proj [D, N, H]
  o_proj.weight     [D, N*H]  -> o_proj [N, H, D]
  gate/up_proj.weight [F, D]  -> gate/up [D, F];  down_proj.weight [D, F] -> down [F, D]
  lm_head.weight    [V, D]    -> lm_head [D, V]
"""

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from align_jax.models.config import ModelConfig
from align_jax.models.hf_config import config_to_hf

__all__ = ["save_hf"]

Params = dict[str, Any]
_CONFIG = "config.json"
_GENERATION_CONFIG = "generation_config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

# --------------------------------------------------------------------------- tensor mapping


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Tensor:
    """One Hugging Face tensor and where it lives in our tree."""

    hf_key: str
    path: tuple[str, ...]
    layer: int | None  # index on the stacked `layers` axis
    hf_shape: tuple[int, ...]
    ours_shape: tuple[int, ...]  # one layer's slice
    layout: str  # copy | transpose | heads_in | heads_out | heads_bias


def _tensors(config: ModelConfig) -> list[_Tensor]:
    """Every tensor of the checkpoint, in the order transformers writes them."""
    d, f, v = config.embed_dim, config.mlp_dim, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    out = [_Tensor(hf_key="model.embed_tokens.weight", path=("embedding",), layer=None,
                   hf_shape=(v, d), ours_shape=(v, d), layout="copy")]
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."

        def add(hf_name, path, hf_shape, ours_shape, layout, i=i, pre=pre):
            out.append(_Tensor(hf_key=pre + hf_name, path=("layers", *path), layer=i,
                               hf_shape=hf_shape, ours_shape=ours_shape, layout=layout))

        for name, heads in (("q", n), ("k", k), ("v", k)):
            add(f"self_attn.{name}_proj.weight", ("attn", f"{name}_proj"), (heads * h, d),
                (d, heads, h), "heads_in")
            if config.qkv_bias:
                add(f"self_attn.{name}_proj.bias", ("attn", f"{name}_bias"), (heads * h,),
                    (heads, h), "heads_bias")
        add("self_attn.o_proj.weight", ("attn", "o_proj"), (d, n * h), (n, h, d), "heads_out")
        if config.out_bias:
            add("self_attn.o_proj.bias", ("attn", "o_bias"), (d,), (d,), "copy")
        for name, hf_shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            add(f"mlp.{name}_proj.weight", ("mlp", name), hf_shape, hf_shape[::-1], "transpose")
            if config.mlp_bias:
                add(f"mlp.{name}_proj.bias", ("mlp", f"{name}_bias"), hf_shape[:1],
                    hf_shape[:1], "copy")
        add("input_layernorm.weight", ("attn_norm", "scale"), (d,), (d,), "copy")
        add("post_attention_layernorm.weight", ("mlp_norm", "scale"), (d,), (d,), "copy")
    out.append(_Tensor(hf_key="model.norm.weight", path=("final_norm", "scale"), layer=None,
                       hf_shape=(d,), ours_shape=(d,), layout="copy"))
    if not config.tie_embeddings:
        out.append(_Tensor(hf_key="lm_head.weight", path=("lm_head",), layer=None,
                           hf_shape=(v, d), ours_shape=(d, v), layout="transpose"))
    return out


def _to_ours(x: np.ndarray, t: _Tensor) -> np.ndarray:
    if t.layout == "transpose":
        return x.T
    if t.layout == "heads_in":  # [N*H, D] -> [D, N, H]
        return x.reshape(t.ours_shape[1], t.ours_shape[2], t.ours_shape[0]).transpose(2, 0, 1)
    if t.layout == "heads_out":  # [D, N*H] -> [N, H, D]
        return x.reshape(t.ours_shape[2], t.ours_shape[0], t.ours_shape[1]).transpose(1, 2, 0)
    if t.layout == "heads_bias":
        return x.reshape(t.ours_shape)
    return x


def _to_hf(y: np.ndarray, t: _Tensor) -> np.ndarray:
    if t.layout == "transpose":
        y = y.T
    elif t.layout == "heads_in":  # [D, N, H] -> [N*H, D]
        y = y.transpose(1, 2, 0)
    elif t.layout == "heads_out":  # [N, H, D] -> [D, N*H]
        y = y.transpose(2, 0, 1)
    return np.ascontiguousarray(y).reshape(t.hf_shape)


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise KeyError(f"params have no {'/'.join(path)} (missing {key!r})")
        tree = tree[key]
    return tree


# --------------------------------------------------------------------------- save


def save_hf(config: ModelConfig, params: Params, path: str, *,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes a checkpoint directory that transformers' AutoModelForCausalLM loads.

    Writes config.json, generation_config.json and model.safetensors, or numbered shards plus
    model.safetensors.index.json when the tensors exceed `max_shard_bytes`. Safetensors files
    left in `path` by an earlier save are removed first so that the two cannot mix.

    Args:
      config: the model.
      params: its parameter tree (plain or boxed), any dtype; tensors keep that dtype.
      path: output directory (created if needed).
      max_shard_bytes: the largest shard; a tensor larger than this gets a shard of its own.
    """
    path = os.fspath(path)
    hf_config = config_to_hf(config)
    params = nn.unbox(params)
    tensors = _tensors(config)
    sizes, dtypes = [], set()
    for t in tensors:
        leaf = _get_path(params, t.path)
        expected = t.ours_shape if t.layer is None else (config.num_layers, *t.ours_shape)
        if tuple(leaf.shape) != expected:
            raise ValueError(f"params {'/'.join(t.path)} has shape {tuple(leaf.shape)}, "
                             f"expected {expected} from the config")
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
            t = tensors[i]
            leaf = _get_path(params, t.path)
            arrays[t.hf_key] = _to_hf(np.asarray(jax.device_get(
                leaf if t.layer is None else leaf[t.layer])), t)
            weight_map[t.hf_key] = name
        save_file(arrays, os.path.join(path, name), metadata={"format": "pt"})
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


def _write_json(file: str, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
