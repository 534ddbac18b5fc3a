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

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from align_jax import axes, sharding

Params = dict[str, Any]
MODEL_TYPES = ("bert", "roberta")
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """A BERT-family encoder.

    num_labels 0 means no classification head. max_length is the longest input the tokenizer
    side should produce (sentence-transformers' max_seq_length when the checkpoint has one).
    """

    model_type: str = "bert"
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    has_pooler: bool = True
    num_labels: int = 0
    max_length: int = 512
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"encoder model_type {self.model_type!r} is not supported; "
                             f"choose one of {MODEL_TYPES}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; choose one of "
                             f"{sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from pad_token_id + 1; BERT from 0."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0


_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def _param(module, name, shape, logical, *, init=None):
    cfg = module.config
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, logical), shape,
                        jnp.dtype(cfg.param_dtype))


def _zeros(module, name, shape, logical):
    return _param(module, name, shape, logical, init=nn.initializers.zeros)


def _layer_norm(x_BTD, scale_D, bias_D, eps):
    x = x_BTD.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return y * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)


class _Norm(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x_BTD):
        d = self.config.embed_dim
        scale = _param(self, "scale", (d,), (axes.EMBED,), init=nn.initializers.ones)
        bias = _zeros(self, "bias", (d,), (axes.EMBED,))
        return _layer_norm(x_BTD, scale, bias, self.config.norm_eps).astype(self.config.dtype)


class _Layer(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x_BTD, mask_BS):
        cfg = self.config
        d, n, h, f = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        dt = jnp.dtype(cfg.dtype)
        qkv = {}
        for name in ("q", "k", "v"):
            w_DNH = _param(self, f"{name}_proj", (d, n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM))
            b_NH = _zeros(self, f"{name}_bias", (n, h), (axes.HEADS, axes.HEAD_DIM))
            qkv[name] = (jnp.einsum("BTD,DNH->BTNH", x_BTD, w_DNH.astype(dt))
                         + b_NH.astype(dt))
        logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", qkv["q"], qkv["k"],
                                 preferred_element_type=jnp.float32) / np.sqrt(h)
        logits_BNTS = jnp.where(mask_BS[:, None, None, :], logits_BNTS, _MASK_VALUE)
        probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(dt)
        out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS, qkv["v"])
        o_NHD = _param(self, "o_proj", (n, h, d), (axes.HEADS, axes.HEAD_DIM, axes.EMBED))
        o_D = _zeros(self, "o_bias", (d,), (axes.EMBED,))
        attn_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, o_NHD.astype(dt)) + o_D.astype(dt)
        x_BTD = _Norm(cfg, name="attn_norm")(x_BTD + attn_BTD)

        up_DF = _param(self, "up", (d, f), (axes.EMBED, axes.MLP))
        up_F = _zeros(self, "up_bias", (f,), (axes.MLP,))
        down_FD = _param(self, "down", (f, d), (axes.MLP, axes.EMBED))
        down_D = _zeros(self, "down_bias", (d,), (axes.EMBED,))
        h_BTF = _ACTIVATIONS[cfg.hidden_act](x_BTD @ up_DF.astype(dt) + up_F.astype(dt))
        h_BTD = h_BTF @ down_FD.astype(dt) + down_D.astype(dt)
        x_BTD = _Norm(cfg, name="mlp_norm")(x_BTD + h_BTD)
        return sharding.constrain(x_BTD, (axes.BATCH, axes.SEQ, axes.EMBED))


class Encoder(nn.Module):
    """Returns (hidden states of every layer, embeddings first; pooled_BD; logits_BC)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, tokens_BT, mask_BT, types_BT):
        cfg = self.config
        d = cfg.embed_dim
        emb = _Embeddings(cfg, name="embeddings")(tokens_BT, types_BT)
        hidden = [emb]
        x_BTD = emb
        mask_BS = mask_BT.astype(bool)
        for i in range(cfg.num_layers):
            x_BTD = _Layer(cfg, name=f"layer_{i}")(x_BTD, mask_BS)
            hidden.append(x_BTD)
        cls_BD = x_BTD[:, 0]
        pooled_BD = logits_BC = None
        if cfg.has_pooler:
            pooled_BD = _Dense(cfg, d, name="pooler")(cls_BD, activation=jnp.tanh)
        if cfg.num_labels:
            if cfg.model_type == "roberta":  # RobertaClassificationHead: dense, tanh, out_proj
                head_BD = _Dense(cfg, d, name="classifier_dense")(cls_BD, activation=jnp.tanh)
                logits_BC = _Dense(cfg, cfg.num_labels, name="classifier")(head_BD)
            else:
                if pooled_BD is None:
                    raise ValueError("a bert classifier needs the pooler (has_pooler=True)")
                logits_BC = _Dense(cfg, cfg.num_labels, name="classifier")(pooled_BD)
            logits_BC = logits_BC.astype(jnp.float32)
        return hidden, pooled_BD, logits_BC


class _Embeddings(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, tokens_BT, types_BT):
        cfg = self.config
        d = cfg.embed_dim
        word_VD = _param(self, "word", (cfg.vocab_size, d), (axes.VOCAB, axes.EMBED))
        pos_PD = _param(self, "position", (cfg.max_positions, d), (None, axes.EMBED))
        type_YD = _param(self, "token_type", (cfg.type_vocab_size, d), (None, axes.EMBED))
        positions_BT = encoder_positions(cfg, tokens_BT)
        x = (jnp.take(word_VD, tokens_BT, axis=0).astype(jnp.float32)
             + jnp.take(pos_PD, positions_BT, axis=0).astype(jnp.float32)
             + jnp.take(type_YD, types_BT, axis=0).astype(jnp.float32))
        x_BTD = _Norm(cfg, name="norm")(x)
        return sharding.constrain(x_BTD, (axes.BATCH, axes.SEQ, axes.EMBED))


class _Dense(nn.Module):
    config: EncoderConfig
    features: int

    @nn.compact
    def __call__(self, x_BD, activation=None):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        w = _param(self, "kernel", (cfg.embed_dim, self.features), (axes.EMBED, None))
        b = _zeros(self, "bias", (self.features,), (None,))
        y = x_BD @ w.astype(dt) + b.astype(dt)
        return activation(y) if activation is not None else y


def encoder_positions(config: EncoderConfig, tokens_BT: jax.Array) -> jax.Array:
    """BERT: 0..T-1. RoBERTa: pad_token_id + 1 + index among non-pad tokens; pads: pad_token_id."""
    t = tokens_BT.shape[1]
    if config.model_type != "roberta":
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_BT.shape)
    real_BT = (tokens_BT != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real_BT, axis=1) * real_BT + config.pad_token_id


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


def abstract_params(config: EncoderConfig):
    """The boxed parameter tree as ShapeDtypeStructs (no memory)."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(
        lambda: Encoder(config).init(jax.random.PRNGKey(0), tokens, tokens + 1, tokens)
    )["params"]


def init_encoder(config: EncoderConfig, rng: jax.Array, *, mesh=None,
                 rules: str = "fsdp") -> Params:
    """Random parameters (normal(0.02) weights, zero biases, unit norms), sharded when `mesh`."""
    tokens = jnp.zeros((1, 2), jnp.int32)

    def init(rng):
        return nn.unbox(Encoder(config).init(rng, tokens, tokens + 1, tokens)["params"])

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = sharding.state_shardings(abstract_params(config), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(rng)


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
                 num_labels: int | None = None):
    """Loads a HF BERT/RoBERTa checkpoint dir -> (EncoderConfig, params); see encoder_hf."""
    from align_jax.models import encoder_hf
    return encoder_hf.load_encoder(path, dtype=dtype, mesh=mesh, rules=rules,
                                   num_labels=num_labels)


def save_encoder(config: EncoderConfig, params: Params, path) -> None:
    """Writes a checkpoint dir transformers loads (BertModel, or *ForSequenceClassification)."""
    from align_jax.models import encoder_hf
    encoder_hf.save_encoder(config, params, path)
