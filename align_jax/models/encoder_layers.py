"""The BERT-family encoder's network: config, Flax modules, parameter init (see encoder.py)."""

import dataclasses
import functools
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


def abstract_params(config: EncoderConfig):
    """The boxed parameter tree as ShapeDtypeStructs (no memory)."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(
        lambda: Encoder(config).init(jax.random.PRNGKey(0), tokens, tokens + 1, tokens)
    )["params"]


def init_encoder(config: EncoderConfig, rng: jax.Array, *, mesh=None,
                 rules: str = "fsdp", optimize: bool = True) -> Params:
    """Random parameters (normal(0.02) weights, zero biases, unit norms), sharded when `mesh`.

    optimize=False compiles the init without XLA's backend optimisations (faster for small
    encoders on a CPU, see `transformer.init_params`).
    """
    tokens = jnp.zeros((1, 2), jnp.int32)

    def init(rng):
        return nn.unbox(Encoder(config).init(rng, tokens, tokens + 1, tokens)["params"])

    return sharding.run_init(init, rng, abstract_params(config), mesh=mesh, rules=rules,
                             optimize=optimize)
