"""A BERT-family encoder (BERT, RoBERTa, MiniLM): one flax.linen module used through pure functions.

Post-LayerNorm blocks, GELU MLP, learned absolute positions, token types, an optional tanh
pooler and a sequence-classification head. Checkpoints are Hugging Face safetensors
(`load_encoder` / `save_encoder`, in encoder_hf.py); parameters carry logical axis names, so
the decoder's sharding rules (`align_jax.sharding`) place them too.

Parameter tree (shapes by the legend in `align_jax.axes`; P = max positions, Y = token types):
  embeddings/{word [V, D], position [P, D], token_type [Y, D], norm_scale [D], norm_bias [D]}
  layer_i/{q,k,v}_proj [D, N, H], {q,k,v}_bias [N, H], o_proj [N, H, D], o_bias [D]
  layer_i/{attn_norm_scale, attn_norm_bias} [D]
  layer_i/up [D, F], up_bias [F], down [F, D], down_bias [D], {mlp_norm_scale, mlp_norm_bias} [D]
  pooler/{kernel [D, D], bias [D]}                       (bert, when the checkpoint has one)
  classifier/{kernel [D, C], bias [C]}                   (bert: on the pooled [CLS])
  classifier/{dense [D, D], dense_bias [D], kernel [D, C], bias [C]}   (roberta's head)
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.models import encoder_hf
from align_jax.models.encoder_layers import (
    MODEL_TYPES,
    Encoder,
    EncoderConfig,
    abstract_params,
    encoder_positions,
    init_encoder,
)

__all__ = ["MODEL_TYPES", "Encoder", "EncoderConfig", "abstract_params", "classifier_logits",
           "classify", "embed_sentences", "encode", "encoder_positions", "init_encoder",
           "load_encoder", "mean_pool", "save_encoder", "tokenize_batch"]

Params = dict[str, Any]


# --------------------------------------------------------------------------- pure functions


def _types(tokens_BT, token_type_ids_BT):
    if token_type_ids_BT is None:
        return jnp.zeros_like(tokens_BT)
    return token_type_ids_BT


@functools.partial(jax.jit, static_argnames=("config",))
def _apply(config, params, tokens_BT, mask_BT, types_BT):
    return Encoder(config).apply({"params": params}, tokens_BT, mask_BT, types_BT)


def encode(config: EncoderConfig, params: Params, tokens_BT, *, attention_mask_BT,
           token_type_ids_BT=None, output_layer: int | None = None) -> jax.Array:
    """Hidden states of the encoder.

    Args:
      config, params: the encoder.
      tokens_BT: token ids [B, T] (with the tokenizer's [CLS]/[SEP] already in place).
      attention_mask_BT: 1 for real tokens, 0 for padding.
      token_type_ids_BT: segment ids (0 first sentence, 1 second); zeros when None.
      output_layer: None for the last layer; k for layer k's output (0 = the embeddings),
        as transformers' hidden_states[k].
    Returns:
      hidden_BTD in the config's dtype.
    """
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    hidden, _, _ = _apply(config, params, tokens_BT, jnp.asarray(attention_mask_BT, jnp.int32),
                          jnp.asarray(_types(tokens_BT, token_type_ids_BT), jnp.int32))
    k = config.num_layers if output_layer is None else output_layer
    if not -len(hidden) <= k < len(hidden):
        raise ValueError(f"output_layer {output_layer} is out of range for an encoder with "
                         f"{config.num_layers} layers (0..{config.num_layers})")
    return hidden[k]


def classify(config: EncoderConfig, params: Params, tokens_BT, *, attention_mask_BT,
             token_type_ids_BT=None) -> jax.Array:
    """Sequence-classification logits [B, C] in float32 (BertForSequenceClassification's)."""
    if not config.num_labels:
        raise ValueError("this encoder has no classification head (num_labels=0)")
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    _, _, logits_BC = _apply(config, params, tokens_BT,
                             jnp.asarray(attention_mask_BT, jnp.int32),
                             jnp.asarray(_types(tokens_BT, token_type_ids_BT), jnp.int32))
    return logits_BC


def classifier_logits(config: EncoderConfig, params: Params, tokens_BT, mask_BT,
                      types_BT) -> jax.Array:
    """`classify` without the jit wrapper or conversions, for use inside a jitted train step."""
    return Encoder(config).apply({"params": params}, tokens_BT, mask_BT, types_BT)[2]


# --------------------------------------------------------------------------- text in


def tokenize_batch(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                   max_length: int, pad_to_multiple: int = 8):
    """Encoder inputs for a batch of texts (or text pairs), padded on the right.

    Args:
      tokenizer: an align_jax Tokenizer with `encode_pair` ([CLS]/[SEP] or <s>/</s> added).
      texts: first segments.
      pairs: optional second segments, one per text.
      max_length: truncation length (the longest segment is cut first).
      pad_to_multiple: pad T up to a multiple of this, so few shapes are compiled.
    Returns:
      numpy (tokens_BT, attention_mask_BT, token_type_ids_BT), int32.
    """
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"tokenize_batch: {len(texts)} texts but {len(pairs)} pairs")
    rows = [tokenizer.encode_pair(t, None if pairs is None else pairs[i], max_length=max_length)
            for i, t in enumerate(texts)]
    longest = max((len(ids) for ids, _ in rows), default=1)
    t = min(-(-longest // pad_to_multiple) * pad_to_multiple, max(max_length, longest))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    tokens = np.full((len(rows), t), pad, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    types = np.zeros((len(rows), t), np.int32)
    for i, (ids, type_ids) in enumerate(rows):
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
        types[i, :len(ids)] = type_ids
    return tokens, mask, types


def mean_pool(hidden_BTD, attention_mask_BT) -> jax.Array:
    """Mean over non-pad tokens, then L2-normalised (sentence-transformers' Pooling + Normalize)."""
    m_BT1 = jnp.asarray(attention_mask_BT, jnp.float32)[..., None]
    summed_BD = jnp.sum(hidden_BTD.astype(jnp.float32) * m_BT1, axis=1)
    mean_BD = summed_BD / jnp.maximum(jnp.sum(m_BT1, axis=1), 1e-9)
    return mean_BD / jnp.maximum(jnp.linalg.norm(mean_BD, axis=-1, keepdims=True), 1e-12)


def embed_sentences(config: EncoderConfig, params: Params, tokenizer, texts: Sequence[str], *,
                    batch_size: int = 64, max_length: int | None = None) -> np.ndarray:
    """Sentence embeddings: mean pooling over non-pad tokens of the last layer, L2-normalised.

    Args:
      config, params: the encoder (e.g. all-MiniLM-L6-v2).
      tokenizer: its tokenizer (`load_tokenizer` on the checkpoint dir).
      texts: the sentences.
      batch_size: rows per forward pass.
      max_length: truncation; default the checkpoint's (256 for all-MiniLM-L6-v2).
    Returns:
      float32 numpy array [N, D], each row of unit norm.
    """
    texts = list(texts)
    max_length = max_length or config.max_length
    out = []
    for start in range(0, len(texts), batch_size):
        tokens, mask, types = tokenize_batch(tokenizer, texts[start:start + batch_size],
                                             max_length=max_length)
        hidden = encode(config, params, tokens, attention_mask_BT=mask, token_type_ids_BT=types)
        out.append(np.asarray(mean_pool(hidden, mask)))
    if not out:
        return np.zeros((0, config.embed_dim), np.float32)
    return np.concatenate(out, axis=0)


def load_encoder(path, *, dtype=jnp.float32, mesh=None, rules: str = "fsdp",
                 num_labels: int | None = None, seed: int = 0):
    """Loads a HF BERT/RoBERTa checkpoint dir -> (EncoderConfig, params); see encoder_hf."""
    return encoder_hf.load_encoder(path, dtype=dtype, mesh=mesh, rules=rules,
                                   num_labels=num_labels, seed=seed)


def save_encoder(config: EncoderConfig, params: Params, path) -> None:
    """Writes a checkpoint dir transformers loads (BertModel, or *ForSequenceClassification)."""
    encoder_hf.save_encoder(config, params, path)
