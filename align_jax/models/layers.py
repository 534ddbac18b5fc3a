"""Layers of the decoder: RMSNorm and LayerNorm, RoPE (full or partial), attention masks and
kernels, the gated and the plain MLP."""

import functools
import logging
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from align_jax import axes, sharding
from align_jax.models import blockwise
from align_jax.models.config import ModelConfig

# Finite, so a query with no visible key (a padding row) gives a uniform softmax, never NaN.
_MASK_VALUE = blockwise.MASK_VALUE
_log = logging.getLogger(__name__)


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param_with_axes(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
                    logical: tuple[str, ...], dtype: str) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, logical), shape, _dtype(dtype))


class Norm(nn.Module):
    """The config's norm, in float32: RMSNorm (`scale`) or LayerNorm (`scale` and `bias`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
        scale_D = param_with_axes(self, "scale", init, (x_BTD.shape[-1],), (axes.EMBED,),
                                  cfg.param_dtype)
        x32 = x_BTD.astype(jnp.float32)
        if cfg.norm == "layer":
            bias_D = param_with_axes(self, "bias", nn.initializers.zeros, (x_BTD.shape[-1],),
                                     (axes.EMBED,), cfg.param_dtype)
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
            y = y * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)
            return y.astype(cfg.dtype)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        return (y * (cfg.norm_offset + scale_D.astype(jnp.float32))).astype(cfg.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim/2] in float32, with the config's scaling applied."""
    h = config.rotary_dim
    exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return (inv / np.float32(s.factor)).astype(np.float32)
    if s.kind == "llama3":
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling kind {s.kind!r}")


def rope_sin_cos(config: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv_freq = jnp.asarray(rope_inv_freq(config))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles_BTh), jnp.cos(angles_BTh)


def apply_rope(x_BTNH: jax.Array, sin_BTh: jax.Array, cos_BTh: jax.Array) -> jax.Array:
    """Rotates the two halves of the first 2h dims of each head (the Hugging Face layout, not
    interleaved); the rest of the head dim, if any (partial rotary), passes through."""
    rot = 2 * sin_BTh.shape[-1]
    x = x_BTNH[..., :rot].astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    sin, cos = sin_BTh[:, :, None, :], cos_BTh[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    out = out.astype(x_BTNH.dtype)
    if rot == x_BTNH.shape[-1]:
        return out
    return jnp.concatenate([out, x_BTNH[..., rot:]], axis=-1)


def attention_mask(q_slot_T: jax.Array, k_slot_S: jax.Array, q_seg_BT: jax.Array,
                   k_seg_BS: jax.Array, *, window: int | None) -> jax.Array:
    """Which keys each query sees, [B, T, S] bool.

    Slots are indices in the (cached) sequence. A query sees a key at or before its own slot,
    of the same segment, that is not padding (segment 0), and within the sliding window.
    `q_slot_T` may also be [B, T]: each row's queries at their own slots (per-row cache index).
    """
    if q_slot_T.ndim == 2:
        q_BT1 = q_slot_T[:, :, None]
        causal_BTS = k_slot_S[None, None, :] <= q_BT1
        if window is not None:
            causal_BTS &= q_BT1 - k_slot_S[None, None, :] < window
        same_BTS = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (k_seg_BS[:, None, :] != 0)
        return causal_BTS & same_BTS
    causal_TS = k_slot_S[None, :] <= q_slot_T[:, None]
    if window is not None:
        causal_TS &= q_slot_T[:, None] - k_slot_S[None, :] < window
    same_BTS = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (k_seg_BS[:, None, :] != 0)
    return causal_TS[None] & same_BTS


def _attend_xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale):
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASK_VALUE)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


def _attend_jax(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, implementation):
    # jax.nn.dot_product_attention handles grouped heads itself (N a multiple of K).
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale,
        implementation=implementation)


@functools.cache
def _note(message: str) -> None:
    # Once per distinct reason: attend() is traced once per layer stack and shape.
    _log.info("attention: %s", message)


def resolve_attention(config: ModelConfig, *, cached: bool, query_len: int,
                      platform: str | None = None) -> str:
    """The implementation `attend` runs: the config's, or for "auto" the platform's best.

    Args:
      config: the model (its `attention`, `dtype` and `head_dim` matter).
      cached: whether this is a cached prefill/decode (keys from a KV cache, no segment ids).
      query_len: T of this call.
      platform: the backend; default `jax.default_backend()`.
    Returns:
      one of "xla", "jax", "cudnn", "splash", "blockwise", and for cached calls "filled"
      (`blockwise.attend_filled`: only the cache's filled slots are read).
    """
    if cached and config.attention in ("auto", "splash"):
        # Prefill and decode read keys from a cache allocated for the whole budget; visiting
        # only its filled blocks makes a step's cost follow the tokens, not the allocation.
        # (Splash takes no cache: it never applied here.)
        return "filled"
    if config.attention != "auto":
        return config.attention
    platform = platform or jax.default_backend()
    if platform == "tpu" and not cached:
        return "splash"
    if platform == "gpu" and not cached:
        if config.dtype in ("bfloat16", "float16"):
            return "cudnn"
        _note(f"cuDNN flash attention needs bfloat16/float16 compute, not {config.dtype}; "
              "using blockwise attention")
    return "blockwise"


def attend(config: ModelConfig, q_BTNH, k_BSKH, v_BSKH, mask_BTS,
           segment_ids_BT=None) -> jax.Array:
    """Scaled dot-product attention with grouped kv heads, by the config's implementation.

    `segment_ids_BT` is given for full forwards (no cache); splash attention needs it.
    "auto" resolves by `resolve_attention`; when cuDNN rejects the inputs at trace time (head
    dim, GPU generation), it falls back to blockwise attention and logs the reason once.
    Cached calls under "auto" or "splash" resolve to "filled", which `Attention` runs over
    the stacked cache (`blockwise.attend_filled`); given one layer's keys here, it is the
    blockwise kernel over them.
    """
    impl = resolve_attention(config, cached=segment_ids_BT is None, query_len=q_BTNH.shape[1])
    if impl == "xla":
        return _attend_xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS, config.scale)
    if impl in ("blockwise", "filled"):
        return blockwise.attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale=config.scale)
    if impl == "jax":
        return _attend_jax(q_BTNH, k_BSKH, v_BSKH, mask_BTS, config.scale, None)
    if impl == "cudnn":
        if config.attention == "cudnn":
            return _attend_jax(q_BTNH, k_BSKH, v_BSKH, mask_BTS, config.scale, "cudnn")
        try:
            return _attend_jax(q_BTNH, k_BSKH, v_BSKH, mask_BTS, config.scale, "cudnn")
        except (NotImplementedError, ValueError, RuntimeError) as e:
            _note(f"cuDNN flash attention unavailable ({str(e).splitlines()[0]}); "
                  "using blockwise attention")
            return blockwise.attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale=config.scale)
    if impl == "splash":
        from align_jax.models import splash  # local: imports Pallas, only for splash attention
        return splash.attend(config, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    raise ValueError(f"unknown attention implementation {config.attention!r}")


def lora_delta(module: nn.Module, target: str, x: jax.Array, spec: str, *,
               dropout: float) -> jax.Array | None:
    """The LoRA term `(x A) (scale B)` of projection `target`, or None without an adapter.

    Adapters live in the `lora` collection (see `align_jax.models.lora`; B comes pre-scaled);
    `spec` is the projection's einsum ("BTD,DNH->BTNH"), from which A's and B's are derived.
    A letter of the weight that the input and the output also carry (the experts E of
    "BECD,EDF->BECF") is shared: each expert has its own A [E, D, R] and B [E, R, F].
    """
    if not module.has_variable("lora", f"{target}_a"):
        return None
    cfg = module.config
    a = module.get_variable("lora", f"{target}_a")
    b = module.get_variable("lora", f"{target}_b")
    ins, out = spec.split("->")
    x_letters, w_letters = ins.split(",")
    shared = "".join(c for c in w_letters if c in x_letters and c in out)
    contracted = "".join(c for c in w_letters if c in x_letters and c not in shared)
    kept = "".join(c for c in x_letters if c not in contracted)
    rest = "".join(c for c in w_letters if c not in contracted and c not in shared)
    if dropout > 0.0 and module.has_rng("lora_dropout"):
        keep = jax.random.bernoulli(module.make_rng("lora_dropout"), 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    h = jnp.einsum(f"{x_letters},{shared}{contracted}R->{kept}R", x, a.astype(cfg.dtype))
    return jnp.einsum(f"{kept}R,{shared}R{rest}->{out}", h, b.astype(cfg.dtype))


def _kernel_init(std: float):
    return nn.initializers.normal(stddev=std)


def _write_kv(c_LBSKH, new_BTKH, layer, cache_index):
    """The stacked cache with this layer's new keys (or values) written at `cache_index`: one
    slot shared by all rows (prompts are left-padded), or per row (an int32 [B], each row at
    its own slot; slots past S are dropped)."""
    new_BTKH = new_BTKH.astype(c_LBSKH.dtype)
    layer = jnp.asarray(layer, jnp.int32)
    cache_index = jnp.asarray(cache_index, jnp.int32)
    if cache_index.ndim == 1:
        b, t = new_BTKH.shape[:2]
        slots_BT = cache_index[:, None] + jnp.arange(t, dtype=jnp.int32)
        return c_LBSKH.at[layer, jnp.arange(b)[:, None], slots_BT].set(new_BTKH, mode="drop")
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(c_LBSKH, new_BTKH[None],
                                        (layer, zero, cache_index, zero, zero))


class Attention(nn.Module):
    config: ModelConfig
    lora_dropout: float = 0.0

    def _proj(self, name, x, shape, logical, spec, bias):
        cfg = self.config
        w = param_with_axes(self, f"{name}_proj", _kernel_init(cfg.init_std), shape, logical,
                            cfg.param_dtype)
        y = jnp.einsum(spec, x, w.astype(cfg.dtype))
        delta = lora_delta(self, name, x, spec, dropout=self.lora_dropout)
        if delta is not None:
            y = y + delta
        if bias:
            b = param_with_axes(self, f"{name}_bias", nn.initializers.zeros, shape[1:],
                                logical[1:], cfg.param_dtype)
            y = y + b.astype(cfg.dtype)
        return y

    @nn.compact
    def __call__(self, x_BTD, sin_cos, mask_BTS, segment_ids_BT, kv_cache=None,
                 cache_index=None, layer=None):
        """Returns (y [B, T, D], the updated cache or None).

        `kv_cache` is the whole stacked cache {"k", "v": [L, B, S, K, H]}; this call writes its
        keys/values at [layer, :, cache_index] (in place when the cache is a scan carry or a
        donated buffer) and attends over that layer's slice.
        """
        cfg = self.config
        d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_BTNH = self._proj("q", x_BTD, (d, n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM),
                            "BTD,DNH->BTNH", cfg.qkv_bias)
        k_BTKH = self._proj("k", x_BTD, (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                            "BTD,DKH->BTKH", cfg.qkv_bias)
        v_BTKH = self._proj("v", x_BTD, (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                            "BTD,DKH->BTKH", cfg.qkv_bias)
        q_BTNH = sharding.constrain(q_BTNH, (axes.BATCH, axes.SEQ, axes.HEADS, axes.HEAD_DIM))
        if sin_cos is not None:  # None: learned absolute positions, added to the embeddings
            sin, cos = sin_cos
            q_BTNH = apply_rope(q_BTNH, sin, cos)
            k_BTKH = apply_rope(k_BTKH, sin, cos)
        if kv_cache is None:
            k_BSKH, v_BSKH, new_cache = k_BTKH, v_BTKH, None
        else:
            new_cache = {name: _write_kv(kv_cache[name], new_BTKH, layer, cache_index)
                         for name, new_BTKH in (("k", k_BTKH), ("v", v_BTKH))}
        if kv_cache is not None and resolve_attention(
                cfg, cached=True, query_len=q_BTNH.shape[1]) == "filled":
            out_BTNH = blockwise.attend_filled(
                q_BTNH, new_cache["k"], new_cache["v"], mask_BTS, layer=layer,
                q_start=cache_index, scale=cfg.scale, window=cfg.sliding_window)
        else:
            if kv_cache is not None:
                k_BSKH, v_BSKH = (
                    jax.lax.dynamic_index_in_dim(new_cache[name], layer, axis=0, keepdims=False)
                    .astype(cfg.dtype) for name in ("k", "v"))
            out_BTNH = attend(cfg, q_BTNH, k_BSKH, v_BSKH, mask_BTS,
                              segment_ids_BT if kv_cache is None else None)
        o = param_with_axes(self, "o_proj", _kernel_init(cfg.init_std), (n, h, d),
                            (axes.HEADS, axes.HEAD_DIM, axes.EMBED), cfg.param_dtype)
        y_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, o.astype(cfg.dtype))
        delta = lora_delta(self, "o", out_BTNH, "BTNH,NHD->BTD", dropout=self.lora_dropout)
        if delta is not None:
            y_BTD = y_BTD + delta
        if cfg.out_bias:
            y_BTD = y_BTD + param_with_axes(self, "o_bias", nn.initializers.zeros, (d,),
                                            (axes.EMBED,), cfg.param_dtype).astype(cfg.dtype)
        return y_BTD, new_cache


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU with silu, GeGLU with gelu; or, with
    `gated_mlp=False`, the plain down(act(up(x))) of GPT-2, GPT-NeoX and Phi."""

    config: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        d, f = cfg.embed_dim, cfg.mlp_dim
        init = _kernel_init(cfg.init_std)

        def dense(name, x, shape, logical, spec):
            w = param_with_axes(self, name, init, shape, logical, cfg.param_dtype)
            y = jnp.einsum(spec, x, w.astype(cfg.dtype))
            delta = lora_delta(self, name, x, spec, dropout=self.lora_dropout)
            if delta is not None:
                y = y + delta
            if cfg.mlp_bias:
                b = param_with_axes(self, name + "_bias", nn.initializers.zeros, shape[-1:],
                                    logical[-1:], cfg.param_dtype)
                y = y + b.astype(cfg.dtype)
            return y

        if cfg.gated_mlp:
            gate_BTF = dense("gate", x_BTD, (d, f), (axes.EMBED, axes.MLP), "BTD,DF->BTF")
            up_BTF = dense("up", x_BTD, (d, f), (axes.EMBED, axes.MLP), "BTD,DF->BTF")
            h_BTF = ACTIVATIONS[cfg.activation](gate_BTF) * up_BTF
        else:
            h_BTF = ACTIVATIONS[cfg.activation](
                dense("up", x_BTD, (d, f), (axes.EMBED, axes.MLP), "BTD,DF->BTF"))
        h_BTF = sharding.constrain(h_BTF, (axes.BATCH, axes.SEQ, axes.MLP))
        return dense("down", h_BTF, (f, d), (axes.MLP, axes.EMBED), "BTF,FD->BTD")
