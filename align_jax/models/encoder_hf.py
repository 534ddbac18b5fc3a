"""BERT-family Hugging Face checkpoints in and out: config.json + safetensors <-> (config, params).

Reads BertModel / RobertaModel checkpoints (keys with or without the `bert.`/`roberta.` prefix,
e.g. sentence-transformers' all-MiniLM-L6-v2) and *ForSequenceClassification ones; writes
BertModel/RobertaModel (no head) or *ForSequenceClassification (with a head), which
transformers reads back. Only safetensors are read (a pickle runs code when loaded).

Layouts (torch Linear stores [out, in]; we store [in, out] with the heads split out):
  attention.self.{query,key,value}.weight [N*H, D] -> {q,k,v}_proj [D, N, H]
  attention.output.dense.weight          [D, N*H] -> o_proj [N, H, D]
  intermediate.dense.weight [F, D] -> up [D, F];  output.dense.weight [D, F] -> down [F, D]
"""

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from align_jax import sharding
from align_jax.atomic import default_mode
from align_jax.models import encoder_layers as encoder
from align_jax.models.encoder_layers import EncoderConfig

Params = dict[str, Any]
_WEIGHTS = "model.safetensors"
# Buffers and pre-training heads that a BertModel / classifier does not use.
_IGNORED_PREFIXES = ("cls.", "lm_head.")
_IGNORED_SUFFIXES = ("position_ids", "token_type_ids")


def _tensor_map(config: EncoderConfig, *, prefix: str) -> dict[str, tuple[tuple[str, ...], str]]:
    """hf key -> (path in our tree, layout)."""
    out = {}
    p = prefix
    emb = {"word_embeddings": "word", "position_embeddings": "position",
           "token_type_embeddings": "token_type"}
    for hf, ours in emb.items():
        out[f"{p}embeddings.{hf}.weight"] = (("embeddings", ours), "copy")
    out[f"{p}embeddings.LayerNorm.weight"] = (("embeddings", "norm", "scale"), "copy")
    out[f"{p}embeddings.LayerNorm.bias"] = (("embeddings", "norm", "bias"), "copy")
    for i in range(config.num_layers):
        pre, lay = f"{p}encoder.layer.{i}.", f"layer_{i}"
        for hf, ours in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{pre}attention.self.{hf}.weight"] = ((lay, f"{ours}_proj"), "heads_in")
            out[f"{pre}attention.self.{hf}.bias"] = ((lay, f"{ours}_bias"), "heads_bias")
        out[f"{pre}attention.output.dense.weight"] = ((lay, "o_proj"), "heads_out")
        out[f"{pre}attention.output.dense.bias"] = ((lay, "o_bias"), "copy")
        out[f"{pre}attention.output.LayerNorm.weight"] = ((lay, "attn_norm", "scale"), "copy")
        out[f"{pre}attention.output.LayerNorm.bias"] = ((lay, "attn_norm", "bias"), "copy")
        out[f"{pre}intermediate.dense.weight"] = ((lay, "up"), "transpose")
        out[f"{pre}intermediate.dense.bias"] = ((lay, "up_bias"), "copy")
        out[f"{pre}output.dense.weight"] = ((lay, "down"), "transpose")
        out[f"{pre}output.dense.bias"] = ((lay, "down_bias"), "copy")
        out[f"{pre}output.LayerNorm.weight"] = ((lay, "mlp_norm", "scale"), "copy")
        out[f"{pre}output.LayerNorm.bias"] = ((lay, "mlp_norm", "bias"), "copy")
    if config.has_pooler:
        out[f"{p}pooler.dense.weight"] = (("pooler", "kernel"), "transpose")
        out[f"{p}pooler.dense.bias"] = (("pooler", "bias"), "copy")
    if config.num_labels:
        if config.model_type == "roberta":
            out["classifier.dense.weight"] = (("classifier_dense", "kernel"), "transpose")
            out["classifier.dense.bias"] = (("classifier_dense", "bias"), "copy")
            out["classifier.out_proj.weight"] = (("classifier", "kernel"), "transpose")
            out["classifier.out_proj.bias"] = (("classifier", "bias"), "copy")
        else:
            out["classifier.weight"] = (("classifier", "kernel"), "transpose")
            out["classifier.bias"] = (("classifier", "bias"), "copy")
    return out


def _to_ours(x: np.ndarray, layout: str, config: EncoderConfig) -> np.ndarray:
    n, h = config.num_heads, config.head_dim
    if layout == "copy":
        return x
    if layout == "transpose":
        return x.T
    if layout == "heads_in":  # [N*H, D] -> [D, N, H]
        return x.T.reshape(x.shape[1], n, h)
    if layout == "heads_bias":
        return x.reshape(n, h)
    if layout == "heads_out":  # [D, N*H] -> [N, H, D]
        return x.T.reshape(n, h, x.shape[0])
    raise AssertionError(layout)


def _to_hf(y: np.ndarray, layout: str) -> np.ndarray:
    if layout == "copy":
        return y
    if layout == "transpose":
        return np.ascontiguousarray(y.T)
    if layout == "heads_in":
        return np.ascontiguousarray(y.reshape(y.shape[0], -1).T)
    if layout == "heads_bias":
        return y.reshape(-1)
    if layout == "heads_out":
        return np.ascontiguousarray(y.reshape(-1, y.shape[-1]).T)
    raise AssertionError(layout)


def _read_json(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not readable JSON ({e})") from e


def config_from_hf(hf: dict[str, Any], *, source: str, has_pooler: bool = True,
                   num_labels: int | None = None, max_length: int | None = None,
                   dtype: str = "float32") -> EncoderConfig:
    """EncoderConfig from a transformers BertConfig/RobertaConfig dict."""
    model_type = hf.get("model_type", "bert")
    if model_type not in encoder.MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not an encoder this loader "
                         f"reads; expected one of {encoder.MODEL_TYPES}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: position_embedding_type "
                         f"{hf['position_embedding_type']!r} is not supported (only absolute)")
    archs = hf.get("architectures") or []
    if num_labels is None:
        is_classifier = any(a.endswith("ForSequenceClassification") for a in archs)
        num_labels = (len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
                      if is_classifier else 0)
    try:
        max_positions = int(hf["max_position_embeddings"])
        offset = hf.get("pad_token_id", 1) + 1 if model_type == "roberta" else 0
        return EncoderConfig(
            model_type=model_type, vocab_size=int(hf["vocab_size"]),
            embed_dim=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]), mlp_dim=int(hf["intermediate_size"]),
            max_positions=max_positions, type_vocab_size=int(hf.get("type_vocab_size", 2)),
            norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(hf.get("pad_token_id") or 0),
            hidden_act=hf.get("hidden_act", "gelu"), has_pooler=has_pooler,
            num_labels=int(num_labels),
            max_length=int(max_length or max_positions - offset), dtype=dtype, param_dtype=dtype)
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r}") from e


def config_to_hf(config: EncoderConfig) -> dict[str, Any]:
    name = {"bert": "Bert", "roberta": "Roberta"}[config.model_type]
    arch = f"{name}ForSequenceClassification" if config.num_labels else f"{name}Model"
    out = {
        "architectures": [arch], "model_type": config.model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.embed_dim,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim, "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_positions,
        "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.norm_eps,
        "pad_token_id": config.pad_token_id, "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
    }
    if config.num_labels:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return out


def _normalise_key(key: str) -> str:
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    if key.endswith(".gamma"):
        return key[:-6] + ".weight"
    if key.endswith(".beta"):
        return key[:-5] + ".bias"
    return key


def load_encoder(path, *, dtype=jnp.float32, mesh=None, rules: str = "fsdp",
                 num_labels: int | None = None, seed: int = 0) -> tuple[EncoderConfig, Params]:
    """Loads a Hugging Face BERT/RoBERTa checkpoint directory.

    Args:
      path: dir with config.json and model.safetensors.
      dtype: the params' and compute dtype.
      mesh, rules: place each parameter straight into its sharded layout.
      num_labels: override the classification head: 0 drops it; a count adds a freshly
        initialised head (normal(0.02), as transformers does) when the checkpoint has none.
      seed: rng seed of a fresh head.
    Returns:
      (EncoderConfig, params).
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    weights = os.path.join(path, _WEIGHTS)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{path} has no {_WEIGHTS} (only safetensors are read)")
    hf = _read_json(config_file)
    st_config = os.path.join(path, "sentence_bert_config.json")
    max_length = (_read_json(st_config).get("max_seq_length")
                  if os.path.isfile(st_config) else None)
    target = np.dtype(jnp.dtype(dtype))
    with safe_open(weights, framework="numpy") as st:
        raw = {_normalise_key(k): k for k in st.keys()}
        model_type = hf.get("model_type", "bert")
        prefix = f"{model_type}." if any(k.startswith(f"{model_type}.") for k in raw) else ""
        config = config_from_hf(hf, source=config_file,
                                has_pooler=f"{prefix}pooler.dense.weight" in raw,
                                num_labels=num_labels, max_length=max_length,
                                dtype=jnp.dtype(dtype).name)
        if config.num_labels and model_type == "bert" and not config.has_pooler:
            config = encoder.dataclasses.replace(config, has_pooler=True)
        wanted = _tensor_map(config, prefix=prefix)
        host: dict[tuple[str, ...], np.ndarray] = {}
        for key, original in raw.items():
            if key not in wanted:
                stripped = key[len(prefix):] if key.startswith(prefix) else key
                if (stripped.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES)
                        or key.startswith("classifier.") or key.startswith(f"{prefix}pooler.")):
                    continue
                raise ValueError(f"{weights}: unexpected tensor {original!r} for a "
                                 f"{model_type} encoder with this config.json")
            path_, layout = wanted[key]
            host[path_] = np.ascontiguousarray(
                _to_ours(st.get_tensor(original), layout, config)).astype(target, copy=False)
    head_rng = None
    abstract = encoder.abstract_params(config)
    for key, (path_, _) in wanted.items():
        if path_ in host:
            expected = _get(abstract, path_).value.shape
            if host[path_].shape != tuple(expected):
                raise ValueError(f"{weights}: tensor {key!r} maps to shape "
                                 f"{host[path_].shape}, expected {tuple(expected)}")
            continue
        if path_[0] in ("classifier", "classifier_dense", "pooler") and num_labels:
            if head_rng is None:
                head_rng = np.random.default_rng(seed)
            host[path_] = _fresh_head_tensor(head_rng, path_, _get(abstract, path_).value.shape,
                                             target)
            continue
        raise ValueError(f"{weights}: missing tensor {key!r}")
    shardings = (sharding.tree_shardings(abstract, mesh, rules) if mesh is not None else None)
    params: Params = {}
    for path_, x in host.items():
        if shardings is None:
            value = jnp.asarray(x)
        else:
            value = jax.make_array_from_callback(x.shape, _get(shardings, path_),
                                                 lambda index, x=x: x[index])
        _set(params, path_, value)
    return config, params


def _fresh_head_tensor(rng: np.random.Generator, path_, shape, dtype) -> np.ndarray:
    """A new head tensor as the model initialises it (kernels normal(0.02), biases zero), drawn
    on the host: initialising the whole encoder to get a few head matrices compiles a random
    init of every parameter (seconds per shape on a CPU)."""
    if path_[-1] == "bias":
        return np.zeros(shape, dtype)
    return (0.02 * rng.standard_normal(shape)).astype(dtype)


def save_encoder(config: EncoderConfig, params: Params, path) -> None:
    """Writes config.json + model.safetensors that transformers' AutoModel (or
    AutoModelForSequenceClassification, when the config has a head) loads."""
    path = os.fspath(path)
    params = nn.unbox(params)
    prefix = f"{config.model_type}." if config.num_labels else ""
    arrays = {}
    for key, (path_, layout) in _tensor_map(config, prefix=prefix).items():
        arrays[key] = _to_hf(np.asarray(jax.device_get(_get(params, path_))), layout)
    os.makedirs(path, exist_ok=True)
    save_file(arrays, os.path.join(path, _WEIGHTS), metadata={"format": "pt"})
    default_mode(os.path.join(path, _WEIGHTS))
    hf = config_to_hf(config)
    hf["dtype"] = jnp.dtype(config.param_dtype).name
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    if config.max_length != config.max_positions - config.position_offset:
        with open(os.path.join(path, "sentence_bert_config.json"), "w", encoding="utf-8") as f:
            json.dump({"max_seq_length": config.max_length}, f)


def _get(tree, path_):
    for k in path_:
        tree = tree[k]
    return tree


def _set(tree, path_, value):
    for k in path_[:-1]:
        tree = tree.setdefault(k, {})
    tree[path_[-1]] = value
