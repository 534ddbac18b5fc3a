"""GGUF (llama.cpp) files in: Llama-family weights, config and tokenizer.

The file is read with the `gguf` package; quantized tensors are dequantized with its numpy code
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K..Q6_K). llama.cpp's
converter reorders the rows of the query and key projections (it pairs rotary dimensions
(i, i + H/2) as adjacent rows, for its interleaved RoPE); `load_gguf` undoes that, so the
result uses the Hugging Face layout and runs through the same forward as `load_hf`.

`gguf_to_hf` writes a Hugging Face checkpoint directory (config.json, model.safetensors and the
tokenizer with its chat template, rebuilt from the GGUF metadata by transformers' converter).
"""

import dataclasses
import os
import shutil
import tempfile
from typing import Any

import jax.numpy as jnp
import numpy as np

from align_jax.models.config import ModelConfig
from align_jax.models.hf_config import config_from_hf
from align_jax.models.hf_tensors import _set_path, _tensors, _to_ours, save_hf

__all__ = ["gguf_to_hf", "load_gguf", "read_gguf_config"]

_MAGIC = b"GGUF"
_ARCHITECTURES = ("llama",)
_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp tensor names -> Hugging Face names ({i} = layer).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


def _open(path: str):
    """A GGUFReader over `path`, with one-line errors for a missing, foreign or cut file."""
    import gguf  # optional: only .gguf files need the gguf package

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != _MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected {_MAGIC!r})")
    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader's own errors are asserts, struct and reshape errors
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({size} bytes; "
                         f"{type(e).__name__}: {e})") from e
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ValueError(f"{path}: truncated: tensor {t.name!r} ends at byte {end} but the "
                             f"file has {size} bytes")
    return reader


def _field(reader, key: str, path: str, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{path}: metadata key {key!r} is missing")
        return default
    return field.contents()


def _hf_config(reader, path: str) -> dict[str, Any]:
    """The Hugging Face config.json the GGUF metadata describes."""
    arch = _field(reader, "general.architecture", path)
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture is {arch!r}; only "
                         f"{', '.join(map(repr, _ARCHITECTURES))} GGUF files are supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' (llama3 RoPE scaling stored as "
                         "frequencies) is not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type", path, None)
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: metadata {arch}.rope.scaling.type={scaling!r} is not "
                         "supported")
    heads = int(_field(reader, f"{arch}.attention.head_count", path))
    embed = int(_field(reader, f"{arch}.embedding_length", path))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size", path,
                   len(tokens.data) if tokens is not None else ...)
    head_dim = int(_field(reader, f"{arch}.attention.key_length", path, embed // heads))
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", path, head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"{path}: metadata {arch}.rope.dimension_count={rope_dims} differs "
                         f"from the head dim {head_dim}; partial RoPE is not supported")

    def token_id(name):
        value = _field(reader, f"tokenizer.ggml.{name}_token_id", path, None)
        return None if value is None else int(value)

    eos = token_id("eos")
    pad = token_id("padding")
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab), "hidden_size": embed,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", path,
                                          heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", path, 10_000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", path, 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": token_id("bos"), "eos_token_id": eos,
        "pad_token_id": pad if pad is not None else eos,
    }


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata only (no tensor is read)."""
    path = os.fspath(path)
    return config_from_hf(_hf_config(_open(path), path), source=path)


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order: per head, rows (0, 2, 4, ..., 1, 3, 5, ...) back."""
    rows = w.shape[0]
    return (w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def _dequantize(tensor, path: str) -> np.ndarray:
    import gguf  # optional: only .gguf files need the gguf package

    kind = tensor.tensor_type.name
    if kind not in _QUANT_TYPES:
        raise ValueError(f"{path}: tensor {tensor.name!r} has type {kind}, which align_jax "
                         f"does not dequantize (supported: {', '.join(_QUANT_TYPES)})")
    x = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGML lists dims innermost first
    return np.asarray(x, np.float32).reshape(shape)


def load_gguf(path: str | os.PathLike, *, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """Loads a Llama-family GGUF file as (config, params), dequantizing every tensor.

    Args:
      path: the .gguf file.
      dtype: dtype of the returned params, and the config's compute/param dtype.
    Returns:
      (config, params), the same tree `load_hf` returns for the equivalent checkpoint.
    Raises:
      ValueError naming the key or tensor for an unsupported architecture or tensor type, a
      truncated file or a file that is not GGUF; FileNotFoundError for a missing file.
    """
    path = os.fspath(path)
    reader = _open(path)
    config = config_from_hf(_hf_config(reader, path), source=path)
    name = jnp.dtype(dtype).name
    config = dataclasses.replace(config, dtype=name, param_dtype=name)
    wanted = {t.hf_key: t for t in _tensors(config)}
    by_hf_name = {}
    for template, hf_template in _NAMES.items():
        if "{i}" in template:
            for i in range(config.num_layers):
                by_hf_name[template.format(i=i)] = hf_template.format(i=i)
        else:
            by_hf_name[template] = hf_template
    target = np.dtype(name)
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    found = set()
    for tensor in reader.tensors:
        hf_key = by_hf_name.get(tensor.name)
        if hf_key is None or hf_key not in wanted:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r} for a llama model "
                             f"with this metadata")
        t = wanted[hf_key]
        x = _dequantize(tensor, path)
        if x.shape != t.hf_shape:
            raise ValueError(f"{path}: tensor {tensor.name!r} has shape {x.shape}, expected "
                             f"{t.hf_shape} from the metadata")
        if tensor.name.endswith("attn_q.weight"):
            x = _unpermute_rope(x, config.num_heads)
        elif tensor.name.endswith("attn_k.weight"):
            x = _unpermute_rope(x, config.num_kv_heads)
        x = _to_ours(x, t).astype(target, copy=False)
        if t.layer is None:
            buffers[t.path] = np.ascontiguousarray(x)
        else:
            if t.path not in buffers:
                buffers[t.path] = np.empty((config.num_layers, *t.ours_shape), target)
            buffers[t.path][t.layer] = x
        found.add(hf_key)
    missing = [k for k, v in by_hf_name.items() if v in wanted and v not in found]
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]!r}")
    params: dict = {}
    for key_path in list(buffers):
        _set_path(params, key_path, jnp.asarray(buffers.pop(key_path)))
    return config, params


def _save_gguf_tokenizer(path: str, out_dir: str) -> None:
    """The tokenizer (with chat template) rebuilt from the GGUF metadata, saved to out_dir."""
    from transformers import AutoTokenizer  # heavy: only the GGUF tokenizer conversion

    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                            gguf_file=os.path.basename(path))
    except Exception as e:
        raise ValueError(f"{path}: transformers could not rebuild the tokenizer from the GGUF "
                         f"metadata ({type(e).__name__}: {e})") from e
    tok.save_pretrained(out_dir)


def gguf_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike, *,
               dtype=jnp.float32) -> str:
    """Writes the GGUF file `path` as a Hugging Face checkpoint directory `out_dir`.

    The directory is written next to `out_dir` under a temporary name and renamed into place
    once complete, so a crash never leaves a half-written checkpoint at `out_dir`.

    Returns:
      out_dir.
    """
    path, out_dir = os.fspath(path), os.fspath(out_dir)
    config, params = load_gguf(path, dtype=dtype)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        save_hf(config, params, tmp)
        _save_gguf_tokenizer(path, tmp)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
