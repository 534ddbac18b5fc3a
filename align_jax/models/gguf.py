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
from typing import Any

import jax.numpy as jnp
import numpy as np

from align_jax import interrupts
from align_jax.atomic import atomic_dir
from align_jax.models.config import ModelConfig
from align_jax.models.hf_config import config_from_hf
from align_jax.models.hf_layout import place, set_path
from align_jax.models.hf_tensors import save_hf, tensors

__all__ = ["gguf_to_hf", "load_gguf", "read_gguf_config"]

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
    """A GGUFReader over `path`, with one-line errors for a missing, foreign or damaged file."""
    # Local: `import align_jax.models` stays free of the gguf package (optional; the GPU
    # bench machine lacks it); gguf_layout imports it too.
    import gguf

    from align_jax.models.gguf_layout import check_layout
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    check_layout(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # what the layout check does not cover (the reader's asserts)
        raise ValueError(f"{path}: corrupt GGUF file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e


def _field(reader, key: str, path: str, default: Any = ..., *, kind: type | None = None) -> Any:
    """Metadata value `key`; `kind` int or float checks it is a number of that kind."""
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{path}: metadata key {key!r} is missing")
        return default
    value = field.contents()
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (numeric and float(value).is_integer()):
        raise ValueError(f"{path}: metadata key {key!r} is {value!r}, expected an integer")
    if kind is float and not numeric:
        raise ValueError(f"{path}: metadata key {key!r} is {value!r}, expected a number")
    return kind(value) if kind is not None else value


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
    def count(key, default=...):
        value = _field(reader, f"{arch}.{key}", path, default, kind=int)
        if value < 1:
            raise ValueError(f"{path}: metadata key '{arch}.{key}' is {value}, expected >= 1")
        return value

    heads = count("attention.head_count")
    embed = count("embedding_length")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = count("vocab_size", len(tokens.data) if tokens is not None else ...)
    head_dim = count("attention.key_length", embed // heads or ...)
    rope_dims = count("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"{path}: metadata {arch}.rope.dimension_count={rope_dims} differs "
                         f"from the head dim {head_dim}; partial RoPE is not supported")

    def token_id(name):
        return _field(reader, f"tokenizer.ggml.{name}_token_id", path, None, kind=int)

    eos = token_id("eos")
    pad = token_id("padding")
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab, "hidden_size": embed,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": count("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path,
                               kind=float),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", path, 10_000.0, kind=float),
        "max_position_embeddings": count("context_length", 4096),
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
    import gguf  # local: see _open

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
    wanted = {t.hf_key: t for t in tensors(config)}
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
        place(buffers, t, x, target)
        found.add(hf_key)
    missing = [k for k, v in by_hf_name.items() if v in wanted and v not in found]
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]!r}")
    params: dict = {}
    for key_path in list(buffers):
        set_path(params, key_path, jnp.asarray(buffers.pop(key_path)))
    return config, params


def _save_gguf_tokenizer(path: str, out_dir: str) -> None:
    """The tokenizer (with chat template) rebuilt from the GGUF metadata, saved to out_dir."""
    from transformers import AutoTokenizer  # heavy: only the GGUF tokenizer conversion

    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                            gguf_file=os.path.basename(path),
                                            trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"{path}: transformers could not rebuild the tokenizer from the GGUF "
                         f"metadata ({type(e).__name__}: {e})") from e
    tok.save_pretrained(out_dir)


def gguf_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike, *,
               dtype=jnp.float32) -> str:
    """Writes the GGUF file `path` as a Hugging Face checkpoint directory `out_dir`.

    The directory is written next to `out_dir` under a temporary name and renamed into place
    once complete (`align_jax.atomic.atomic_dir`), so a crash never leaves a half-written
    checkpoint at `out_dir`, and an earlier one there stays until the new one is whole.

    Returns:
      out_dir.
    """
    path, out_dir = os.fspath(path), os.fspath(out_dir)
    with interrupts.phase("gguf_convert"):
        config, params = load_gguf(path, dtype=dtype)
        with atomic_dir(out_dir) as tmp:
            save_hf(config, params, os.fspath(tmp))
            _save_gguf_tokenizer(path, os.fspath(tmp))
    return out_dir
