"""Pallas splash attention (TPU), for training and full forwards without a cache.

The kernel takes structured masks (causal, or local for a sliding window) plus segment ids
instead of a dense [B, T, S] mask. Off TPU it runs in Pallas interpret mode, which is slow and
meant only for checking it against the XLA reference on CPU.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from align_jax import axes, sharding
from align_jax.models.config import ModelConfig

_BLOCK = 512
_MIN_BLOCK = 128


def _kernel(num_heads: int, seq_len: int, window: int | None, block: int, interpret: bool):
    if window is None:
        one = sm.CausalMask((seq_len, seq_len))
    else:
        # A query sees keys at most window - 1 slots back, as in the XLA mask.
        one = sm.LocalMask((seq_len, seq_len), window_size=(window - 1, 0), offset=0)
    # Built per trace, not cached: the kernel holds arrays made under the current trace.
    mask = sm.MultiHeadMask([one] * num_heads)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                              interpret=interpret)


def attend(config: ModelConfig, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT) -> jax.Array:
    """Causal (or sliding-window) attention within segments; segment 0 is padding."""
    b, t, n, h = q_BTNH.shape
    block = min(_BLOCK, max(_MIN_BLOCK, 1 << (t - 1).bit_length()))
    padded = -(-t // block) * block
    if padded != t:
        # Padding slots get segment 0: real queries never see them.
        pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, pad) for x in (q_BTNH, k_BTKH, v_BTKH))
        segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, padded - t)))
    interpret = jax.default_backend() != "tpu"

    def per_shard(q_BTNH, k_BTKH, v_BTKH, seg_BT):
        kernel = _kernel(q_BTNH.shape[2], padded, config.sliding_window, block, interpret)
        # The kernel does not scale queries itself.
        q_BNTH = (q_BTNH * jnp.asarray(config.scale, q_BTNH.dtype)).transpose(0, 2, 1, 3)
        k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s))  # noqa: E731
        return jax.vmap(one)(q_BNTH, k_BKTH, v_BKTH, seg_BT).transpose(0, 2, 1, 3)

    # pallas_call is not partitioned by the compiler: under a mesh, run it per shard.
    q_axes = (axes.BATCH, None, axes.HEADS, None)
    kv_axes = (axes.BATCH, None, axes.KV_HEADS, None)
    fn = sharding.shard_map_logical(
        per_shard, in_logical=(q_axes, kv_axes, kv_axes, (axes.BATCH, None)),
        out_logical=q_axes, shapes=(q_BTNH.shape, k_BTKH.shape, v_BTKH.shape,
                                    segment_ids_BT.shape))
    out_BTNH = fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    return out_BTNH[:, :t]
