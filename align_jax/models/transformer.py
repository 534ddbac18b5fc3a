"""The decoder-only transformer: one flax.linen module, used through pure functions.

Parameters are a plain nested dict; layers are stacked on a leading `layers` axis and run
under `nn.scan` (one compiled layer), optionally rematerialised.

Parameter tree (shapes by the legend in `align_jax.axes`):
  embedding                       [V, D]
  position_embedding              [P, D]           (learned positions, GPT-2; P = max_position)
  layers/attn_norm/scale          [L, D]           (+ bias [L, D] for LayerNorm)
  layers/attn/{q,k,v}_proj        [L, D, N|K, H]   (+ {q,k,v}_bias [L, N|K, H] with qkv_bias)
  layers/attn/o_proj              [L, N, H, D]     (+ o_bias [L, D] with out_bias)
  layers/mlp_norm/scale           [L, D]           (absent for parallel_shared_norm, Phi)
  layers/mlp/{gate,up}            [L, D, F];  layers/mlp/down [L, F, D]
                                                   (no gate when gated_mlp=False; biases
                                                   {gate,up,down}_bias with mlp_bias)
  layers/mlp/router               [L, D, E]        (mixture of experts instead of the above:)
  layers/mlp/{gate,up}            [L, E, D, F];  layers/mlp/down [L, E, F, D]
  final_norm/scale                [D]              (+ bias [D])
  lm_head                         [D, V]           (absent when embeddings are tied)
  lm_head_bias                    [V]              (head_bias, Phi)

With a head bias, `Decoder.hidden` appends a constant 1 to the hidden state and
`Decoder.unembed_matrix` the bias as a last row ([D + 1, V]), so every caller that unembeds
hidden states itself (prefill, chunked log-probs) applies the bias unchanged.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from align_jax import axes, sharding
from align_jax.models import auxiliary, layers, moe
from align_jax.models import lora as lora_lib
from align_jax.models.config import ModelConfig

Params = dict[str, Any]

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Two [B, T, D] tensors a layer (named in Block): the backward recomputes the attention
    # block from the layer input and the MLP block from the MLP input, nothing T x S or T x F.
    "attn_mlp": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_in"),
}


class Block(nn.Module):
    config: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, carry, sin_cos, mask_BTS, segment_ids_BT, cache_index, layer):
        """One layer. `carry` is (x [B, T, D], the whole stacked KV cache or None); the cache
        is carried through the layer scan and this layer's new keys/values are written into
        it in place (at [layer, :, cache_index]), so a decode step never copies the cache."""
        cfg = self.config
        x_BTD, kv_cache = carry
        n_BTD = layers.Norm(cfg, name="attn_norm")(x_BTD)
        a_BTD, kv_cache = layers.Attention(cfg, self.lora_dropout, name="attn")(
            n_BTD, sin_cos, mask_BTS, segment_ids_BT, kv_cache, cache_index, layer)
        a_BTD = checkpoint_name(a_BTD, "attn_out")
        if cfg.residual == "sequential":
            x_BTD = x_BTD + a_BTD
            h_BTD = checkpoint_name(layers.Norm(cfg, name="mlp_norm")(x_BTD), "mlp_in")
        elif cfg.residual == "parallel":
            h_BTD = checkpoint_name(layers.Norm(cfg, name="mlp_norm")(x_BTD), "mlp_in")
        else:
            h_BTD = checkpoint_name(n_BTD, "mlp_in")
        stats = None
        if cfg.num_experts:
            h_BTD, stats = moe.MoE(cfg, self.lora_dropout, name="mlp")(h_BTD, segment_ids_BT)
        else:
            h_BTD = layers.MLP(cfg, self.lora_dropout, name="mlp")(h_BTD)
        if cfg.residual != "sequential":
            # Both branches read the layer input; (a + m) + x is transformers' order too.
            h_BTD = a_BTD + h_BTD
        x_BTD = sharding.constrain(x_BTD + h_BTD, (axes.BATCH, axes.SEQ, axes.EMBED))
        return (x_BTD, kv_cache), stats


def _write_segments(seg_BS, segment_ids_BT, index):
    """(the cache's segment ids with this call's written at `index`, the query slots): a
    scalar index writes every row at one slot (q slots [T]); a per-row index [B] writes each
    row at its own slot (q slots [B, T]: continuous batching, `align_jax.generate.rows`)."""
    t = segment_ids_BT.shape[1]
    seg_BT = segment_ids_BT.astype(jnp.int32)
    if jnp.ndim(index) == 0:
        return (jax.lax.dynamic_update_slice_in_dim(seg_BS, seg_BT, index, axis=1),
                index + jnp.arange(t, dtype=jnp.int32))
    write = jax.vmap(lambda s_S, x_T, i: jax.lax.dynamic_update_slice_in_dim(s_S, x_T, i, 0))
    return write(seg_BS, seg_BT, index), index[:, None] + jnp.arange(t, dtype=jnp.int32)


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Positions that restart at 0 at the start of each segment (packed rows)."""
    t = segment_ids_BT.shape[1]
    idx_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BT.shape)
    starts_BT = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
         segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    start_idx_BT = jax.lax.cummax(jnp.where(starts_BT, idx_BT, 0), axis=1)
    return idx_BT - start_idx_BT


class Decoder(nn.Module):
    config: ModelConfig
    # Dropout on LoRA adapter inputs (used only with a `lora_dropout` rng).
    lora_dropout: float = 0.0

    def setup(self):
        cfg = self.config
        self.embedding = layers.param_with_axes(
            self, "embedding", nn.initializers.normal(stddev=cfg.init_std),
            (cfg.vocab_size, cfg.embed_dim), (axes.VOCAB, axes.EMBED), cfg.param_dtype)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "lora_dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: axes.LAYERS},
        )(cfg, self.lora_dropout, name="layers")
        self.final_norm = layers.Norm(cfg, name="final_norm")
        if cfg.positions == "learned":
            self.position_embedding = layers.param_with_axes(
                self, "position_embedding", nn.initializers.normal(stddev=cfg.init_std),
                (cfg.max_position, cfg.embed_dim), (None, axes.EMBED), cfg.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = layers.param_with_axes(
                self, "lm_head", nn.initializers.normal(stddev=cfg.init_std),
                (cfg.embed_dim, cfg.vocab_size), (axes.EMBED, axes.VOCAB), cfg.param_dtype)
        if cfg.head_bias:
            self.lm_head_bias = layers.param_with_axes(
                self, "lm_head_bias", nn.initializers.zeros, (cfg.vocab_size,), (axes.VOCAB,),
                cfg.param_dtype)

    def hidden(self, tokens_BT, positions_BT, segment_ids_BT, cache=None):
        """Final-normed hidden states [B, T, D] (and the updated cache, or None)."""
        cfg = self.config
        x_BTD = jnp.take(self.embedding.astype(cfg.dtype), tokens_BT, axis=0)
        if cfg.scale_embeddings:
            x_BTD = x_BTD * jnp.asarray(cfg.embed_dim ** 0.5, dtype=cfg.dtype)
        sin_cos = None
        if cfg.positions == "learned":
            # Clipped, not NaN-filled: a padding slot's position may run past the table.
            x_BTD = x_BTD + jnp.take(self.position_embedding.astype(cfg.dtype), positions_BT,
                                     axis=0, mode="clip")
        else:
            sin_cos = layers.rope_sin_cos(cfg, positions_BT)
        x_BTD = sharding.constrain(x_BTD, (axes.BATCH, axes.SEQ, axes.EMBED))
        t = tokens_BT.shape[1]
        if cache is None:
            slots_T = jnp.arange(t, dtype=jnp.int32)
            mask_BTS = layers.attention_mask(slots_T, slots_T, segment_ids_BT, segment_ids_BT,
                                             window=cfg.sliding_window)
            index, kv = jnp.int32(0), None
        else:
            index = cache["index"]
            k_seg_BS, q_slot_T = _write_segments(cache["segment_ids"], segment_ids_BT, index)
            k_slot_S = jnp.arange(k_seg_BS.shape[1], dtype=jnp.int32)
            mask_BTS = layers.attention_mask(q_slot_T, k_slot_S, segment_ids_BT, k_seg_BS,
                                             window=cfg.sliding_window)
            kv = {"k": cache["k"], "v": cache["v"]}
        # The cache rides in the scan's carry (updated in place), not as per-layer xs/ys: a
        # scanned cache would come back as a freshly stacked copy on every decode step.
        layer_L = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x_BTD, new_kv), stats_L = self.layers((x_BTD, kv), sin_cos, mask_BTS, segment_ids_BT,
                                               index, layer_L)
        if stats_L is not None:
            # Router statistics summed over layers; kept only when the caller asks for the
            # `intermediates` collection (`_apply` under `auxiliary.collect`).
            self.sow("intermediates", "moe_stats",
                     jax.tree.map(lambda s_L: jnp.sum(s_L, axis=0), stats_L))
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_kv["k"], "v": new_kv["v"], "segment_ids": k_seg_BS,
                         "index": index + t}
        h_BTD = self.final_norm(x_BTD)
        if cfg.head_bias:
            h_BTD = jnp.concatenate([h_BTD, jnp.ones((*h_BTD.shape[:-1], 1), h_BTD.dtype)], -1)
        return h_BTD, new_cache

    def unembed_matrix(self):
        """The [D, V] output projection (the embedding transposed when tied), [D + 1, V] with
        the head bias as its last row."""
        w_DV = self.embedding.T if self.config.tie_embeddings else self.lm_head
        if self.config.head_bias:
            w_DV = jnp.concatenate([w_DV, self.lm_head_bias[None, :].astype(w_DV.dtype)], 0)
        return w_DV

    def __call__(self, tokens_BT, positions_BT, segment_ids_BT, cache=None):
        h_BTD, new_cache = self.hidden(tokens_BT, positions_BT, segment_ids_BT, cache)
        w_DV = self.unembed_matrix().astype(self.config.dtype)
        logits_BTV = jnp.einsum("BTD,DV->BTV", h_BTD, w_DV, preferred_element_type=jnp.float32)
        logits_BTV = sharding.constrain(logits_BTV, (axes.BATCH, axes.SEQ, axes.VOCAB))
        return logits_BTV, new_cache


def _inputs(tokens_BT, positions_BT, segment_ids_BT):
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones_like(tokens_BT)
    segment_ids_BT = jnp.asarray(segment_ids_BT, jnp.int32)
    if positions_BT is None:
        positions_BT = positions_from_segments(segment_ids_BT)
    return tokens_BT, jnp.asarray(positions_BT, jnp.int32), segment_ids_BT


def _apply(config: ModelConfig, params, lora: lora_lib.Adapters | None, *args, **kwargs):
    """Decoder.apply with params that may carry LoRA adapters (`lora.LoraParams`)."""
    rng = None
    if isinstance(params, lora_lib.LoraParams):
        if lora is not None:
            raise ValueError("forward: params already carry adapters; do not also pass lora=")
        params, lora, rng = params.base, params.adapters, params.dropout_rng
    variables = {"params": params}
    dropout = 0.0
    if lora is not None:
        variables["lora"] = lora_lib.lora_variables(lora)
        dropout = lora.spec.dropout
    rngs = {"lora_dropout": rng} if rng is not None and dropout > 0.0 else None
    if not (config.num_experts and auxiliary.active()):
        return Decoder(config, dropout).apply(variables, *args, rngs=rngs, **kwargs)
    out, state = Decoder(config, dropout).apply(variables, *args, rngs=rngs,
                                                mutable=["intermediates"], **kwargs)
    stats = state.get("intermediates", {}).get("moe_stats")
    if stats is not None:
        metrics = moe.aux_metrics(config, stats[0])
        auxiliary.record((params, None if lora is None else lora.weights), metrics=metrics,
                         loss=config.router_aux_loss_coef * metrics["router_aux_loss"])
    return out


def forward(config: ModelConfig, params: Params, tokens_BT: jax.Array, *,
            positions_BT: jax.Array | None = None,
            segment_ids_BT: jax.Array | None = None,
            lora: lora_lib.Adapters | None = None) -> jax.Array:
    """Logits [B, T, V] in float32.

    Args:
      config: the model.
      params: the parameter tree (see the module docstring).
      tokens_BT: int token ids.
      positions_BT: RoPE positions; by default they restart at 0 in each segment.
      segment_ids_BT: 0 marks padding; tokens attend only within their own segment (packing).
      lora: LoRA adapters to apply (`align_jax.models.lora`); params may also be a
        `lora.LoraParams` (base + adapters), which every function here accepts.
    """
    tokens_BT, positions_BT, segment_ids_BT = _inputs(tokens_BT, positions_BT, segment_ids_BT)
    logits_BTV, _ = _apply(config, params, lora, tokens_BT, positions_BT, segment_ids_BT)
    return logits_BTV


def forward_with_aux(config: ModelConfig, params: Params, tokens_BT: jax.Array, *,
                     positions_BT: jax.Array | None = None,
                     segment_ids_BT: jax.Array | None = None,
                     lora: lora_lib.Adapters | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`forward` and the auxiliary metrics of the forward: for a mixture of experts the
    router's load-balancing loss (unweighted) and the share of dropped assignments
    (`moe.aux_metrics`); {} for a dense model. Padding (segment 0) is not counted."""
    with auxiliary.collect(None) as collected:
        logits_BTV = forward(config, params, tokens_BT, positions_BT=positions_BT,
                             segment_ids_BT=segment_ids_BT, lora=lora)
    metrics = dict(collected.metrics[0]) if collected.metrics else {}
    if not metrics and config.num_experts:
        raise AssertionError("a mixture-of-experts forward recorded no router statistics")
    return logits_BTV, metrics


def forward_hidden(config: ModelConfig, params: Params, tokens_BT: jax.Array, *,
                   positions_BT: jax.Array | None = None,
                   segment_ids_BT: jax.Array | None = None,
                   lora: lora_lib.Adapters | None = None) -> tuple[jax.Array, jax.Array]:
    """(final hidden states [B, T, D], output projection [D, V]) for chunked-vocab losses;
    with a head bias [B, T, D + 1] and [D + 1, V] (a constant 1 and the bias row)."""
    tokens_BT, positions_BT, segment_ids_BT = _inputs(tokens_BT, positions_BT, segment_ids_BT)
    h_BTD, _ = _apply(config, params, lora, tokens_BT, positions_BT, segment_ids_BT,
                      method=Decoder.hidden)
    w_DV = _apply(config, params, lora, method=Decoder.unembed_matrix)
    return h_BTD, w_DV.astype(config.dtype)


def init_cache(config: ModelConfig, batch: int, max_len: int, *,
               dtype: str | None = None) -> dict[str, jax.Array]:
    """An empty KV cache.

    k, v:          [L, B, S, K, H]
    segment_ids:   [B, S], 0 for empty or padding slots
    index:         int32 scalar, the next slot to write (shared by all rows); a caller may
                   replace it by an int32 [B], each row's own next slot (`forward_with_cache`
                   then writes and masks per row: `align_jax.generate.rows`)
    """
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.int32(0)}


def cache_axes() -> dict[str, tuple[str | None, ...]]:
    """Logical axes of each cache entry, for `align_jax.sharding.named_sharding`."""
    kv = (axes.LAYERS, axes.BATCH, axes.KV_SEQ, axes.KV_HEADS, axes.HEAD_DIM)
    return {"k": kv, "v": kv, "segment_ids": (axes.BATCH, axes.KV_SEQ), "index": ()}


def forward_with_cache(config: ModelConfig, params: Params, tokens_BT: jax.Array, *,
                       cache: dict[str, jax.Array], positions_BT: jax.Array,
                       segment_ids_BT: jax.Array | None = None,
                       lora: lora_lib.Adapters | None = None):
    """Logits [B, T, V] for T new tokens written at the cache's index; returns (logits, cache).

    Used for prefill (T = prompt length, left-padded with segment id 0) and decode (T = 1).
    """
    tokens_BT, positions_BT, segment_ids_BT = _inputs(tokens_BT, positions_BT, segment_ids_BT)
    return _apply(config, params, lora, tokens_BT, positions_BT, segment_ids_BT, cache)


def _init_boxed(config: ModelConfig, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config).init(rng, tokens, tokens, tokens + 1)["params"]


def abstract_params(config: ModelConfig):
    """Shapes and dtypes of the params, boxed with their logical axes; allocates nothing."""
    return jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))


# XLA options of an init compiled with optimize=False (see init_params).
def init_params(config: ModelConfig, rng: jax.Array, *, mesh=None, rules: str = "fsdp",
                optimize: bool = True) -> Params:
    """Random params; with a mesh, each is created directly in its sharded layout.

    optimize=False: compiled without XLA's backend optimisations (`sharding.run_init`).
    """
    return sharding.run_init(lambda r: nn.unbox(_init_boxed(config, r)), rng,
                             abstract_params(config), mesh=mesh, rules=rules, optimize=optimize)


def param_count(params_or_abstract) -> int:
    leaves = jax.tree.leaves(nn.unbox(params_or_abstract))
    return int(sum(x.size for x in leaves))


def jit_forward(config: ModelConfig, *, mesh=None, rules: str = "fsdp"):
    """`forward` compiled once per input shape; with a mesh, sharded by `rules`.

    Returns a function (params, tokens_BT, positions_BT, segment_ids_BT) -> logits_BTV. With a
    mesh, params should already be placed (e.g. by `init_params(..., mesh=mesh)`), and the
    batch is split over the preset's batch axes.
    """

    def fn(params, tokens_BT, positions_BT, segment_ids_BT):
        with sharding.use_mesh(mesh, rules):
            return forward(config, params, tokens_BT, positions_BT=positions_BT,
                           segment_ids_BT=segment_ids_BT)

    if mesh is None:
        return jax.jit(fn)
    param_shardings = sharding.tree_shardings(abstract_params(config), mesh, rules)
    batch = sharding.batch_sharding(mesh, rules, 2)
    out = sharding.named_sharding((axes.BATCH, axes.SEQ, axes.VOCAB), mesh, rules)
    return jax.jit(fn, in_shardings=(param_shardings, batch, batch, batch), out_shardings=out)
