"""The sparse mixture-of-experts MLP (Mixtral): a router, the top k of E gated experts.

Routing is transformers' Mixtral routing: router logits in the compute dtype, a float32
softmax, the top k probabilities renormalised to sum to 1, and the output
sum_j w_j expert_{e_j}(x).

Dispatch: capacity-based, per row, by gathers. Each row of the batch is its own group, so
its routing does not depend on the other rows or on the mesh (sharded equals single device).
In a row of T tokens every expert has Q = min(T, ceil(capacity_factor * T * k / E)) slots.
The row's assignments are ranked first choices first (every token's first choice in token
order, then every second choice, ...), and the i-th assignment to an expert takes its slot i;
one past the Q-th is dropped (it adds nothing) and counted. Padding (segment 0) takes no slot.
Tokens are gathered into a [B, E, Q, D] buffer, the experts run as batched matmuls
([B, E, Q, D] x [E, D, F]), and each (token, choice) gathers its expert's output back.

Memory: the expert buffers hold B * E * Q rows of D (and of F inside the expert), at most
capacity_factor * k * T per row, plus the combine's [B, k, T, D]; a dense dispatch (every
token through every expert, then masked) holds E * T rows per row. For Mixtral (E = 8, k = 2)
at the default capacity_factor 2 that is half the dense rows and a quarter of its expert
FLOPs (benchmarks/bench_moe.py measures it). Decoding (T = 1) gets Q = 1 and, since a token
never picks an expert twice, can drop nothing; Q never exceeds T, so capacity_factor >= E / k
drops nothing anywhere (at the dense size).

Why not `jax.lax.ragged_dot` (sorted tokens, no capacity): TPU and GPU lower it natively,
but the CPU lowering expands it to a dense [E, tokens, D] operand, the tensor this layer
exists to avoid, and its batching rule cannot take one group per row.

Under a mesh the buffer is laid out expert-major: `axes.EXPERTS` claims its mesh axes first
(the presets map it onto data/fsdp, as the expert weights at rest), the rows take the batch
axes left over, so the compiler moves each row's tokens to their experts' devices (an
all-to-all) and every device runs only its own experts (expert parallelism).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from align_jax import axes, sharding
from align_jax.models import layers
from align_jax.models.config import ModelConfig

# Per-layer router statistics, summed over the layers by the decoder (`aux_metrics`).
STATS = ("expert_counts", "expert_probs", "tokens", "dropped")


def capacity(config: ModelConfig, tokens: int) -> int:
    """Slots per expert in a row of `tokens` tokens (module docstring)."""
    c = math.ceil(config.capacity_factor * tokens * config.experts_per_token / config.num_experts)
    return max(1, min(tokens, c))


def _gather_rows(x_BSX: jax.Array, index_BI: jax.Array) -> jax.Array:
    """x[b, index[b, i]] -> [B, I, ...]: a gather with the batch as a batch dimension."""
    return jax.vmap(lambda x, i: x[i])(x_BSX, index_BI)


class MoE(nn.Module):
    """Returns (y [B, T, D], the layer's router statistics, see STATS)."""

    config: ModelConfig
    lora_dropout: float = 0.0

    def _experts(self, name, x, shape, logical, spec):
        cfg = self.config
        w = layers.param_with_axes(self, name, nn.initializers.normal(stddev=cfg.init_std),
                                   shape, logical, cfg.param_dtype)
        y = jnp.einsum(spec, x, w.astype(cfg.dtype))
        delta = layers.lora_delta(self, name, x, spec, dropout=self.lora_dropout)
        return y if delta is None else y + delta

    @nn.compact
    def __call__(self, x_BTD, segment_ids_BT):
        cfg = self.config
        b, t, d = x_BTD.shape
        e, k, f = cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim
        c = capacity(cfg, t)
        router_DE = layers.param_with_axes(
            self, "router", nn.initializers.normal(stddev=cfg.init_std), (d, e),
            (axes.EMBED, None), cfg.param_dtype)
        logits_BTE = jnp.einsum("BTD,DE->BTE", x_BTD, router_DE.astype(cfg.dtype))
        probs_BTE = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
        top_BTk, expert_BTk = jax.lax.top_k(probs_BTE, k)
        weight_BTk = top_BTk / jnp.sum(top_BTk, axis=-1, keepdims=True)
        real_BT = segment_ids_BT != 0

        # Rank the row's assignments first choices first: i-th assignment to an expert -> slot i.
        expert_BkT = jnp.swapaxes(expert_BTk, 1, 2)
        hot_BkTE = jax.nn.one_hot(expert_BkT, e, dtype=jnp.int32) * real_BT[:, None, :, None]
        rank_BMe = jnp.cumsum(hot_BkTE.reshape(b, k * t, e), axis=1) - 1
        slot_BkT = jnp.take_along_axis(rank_BMe, expert_BkT.reshape(b, k * t, 1),
                                       axis=2).reshape(b, k, t)
        keep_BkT = real_BT[:, None, :] & (slot_BkT < c)
        # Flat slot e * Q + i; E * Q (one past the end) for a dropped or padding assignment.
        flat_BkT = jnp.where(keep_BkT, expert_BkT * c + slot_BkT, e * c)

        # Which token fills each slot (T: an empty slot, reading a zero row).
        token_BkT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, k, t))
        rows_BkT = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None, None], (b, k, t))
        token_BS = jnp.full((b, e * c), t, jnp.int32).at[rows_BkT, flat_BkT].set(
            token_BkT, mode="drop")
        x_pad_BTD = jnp.concatenate([x_BTD, jnp.zeros((b, 1, d), x_BTD.dtype)], axis=1)
        x_BEQD = _gather_rows(x_pad_BTD, token_BS).reshape(b, e, c, d)
        expert_major = (axes.BATCH, axes.EXPERTS, None, None)
        x_BEQD = sharding.constrain(x_BEQD, expert_major, first=(axes.EXPERTS,))

        gate_BEQF = self._experts("gate", x_BEQD, (e, d, f), (axes.EXPERTS, axes.EMBED, axes.MLP),
                                  "BECD,EDF->BECF")
        up_BEQF = self._experts("up", x_BEQD, (e, d, f), (axes.EXPERTS, axes.EMBED, axes.MLP),
                                "BECD,EDF->BECF")
        h_BEQF = layers.ACTIVATIONS[cfg.activation](gate_BEQF) * up_BEQF
        y_BEQD = self._experts("down", h_BEQF, (e, f, d), (axes.EXPERTS, axes.MLP, axes.EMBED),
                               "BECF,EFD->BECD")
        y_BEQD = sharding.constrain(y_BEQD, expert_major, first=(axes.EXPERTS,))
        y_BEQD = sharding.constrain(y_BEQD, (axes.BATCH, None, None, None))

        y_pad_BSD = jnp.concatenate([y_BEQD.reshape(b, e * c, d),
                                     jnp.zeros((b, 1, d), y_BEQD.dtype)], axis=1)
        y_BkTD = _gather_rows(y_pad_BSD, flat_BkT.reshape(b, k * t)).reshape(b, k, t, d)
        weight_BkT = jnp.swapaxes(weight_BTk, 1, 2)
        # Mixed in float32 (transformers scales each expert's output by its float32 weight).
        out_BTD = jnp.einsum("BkTD,BkT->BTD", y_BkTD.astype(jnp.float32), weight_BkT)

        realf_BT = real_BT.astype(jnp.float32)
        stats = {
            "expert_counts": jnp.sum(jnp.sum(hot_BkTE, axis=1).astype(jnp.float32),
                                     axis=(0, 1)),
            "expert_probs": jnp.einsum("BTE,BT->E", probs_BTE, realf_BT),
            "tokens": jnp.sum(realf_BT),
            "dropped": jnp.sum((real_BT[:, None, :] & ~keep_BkT).astype(jnp.float32)),
        }
        return out_BTD.astype(cfg.dtype), stats


def aux_metrics(config: ModelConfig, stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The load-balancing loss and the drop rate from router statistics summed over layers.

    The loss is transformers' `load_balancing_loss_func` with an attention mask: over every
    layer's real tokens, f_e = assignments to expert e per token and P_e = mean router
    probability of e; loss = E * sum_e f_e P_e (its minimum, k, means perfectly even load).

    Args:
      config: the model.
      stats: `STATS` summed over the layers.
    Returns:
      {"router_aux_loss": float32 scalar, "moe_dropped_fraction": the share of real
      assignments that found their expert full}.
    """
    rows = jnp.maximum(stats["tokens"], 1.0)
    loss = config.num_experts * jnp.sum(stats["expert_counts"] / rows
                                        * (stats["expert_probs"] / rows))
    dropped = stats["dropped"] / (rows * config.experts_per_token)
    return {"router_aux_loss": loss, "moe_dropped_fraction": dropped}
