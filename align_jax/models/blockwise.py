"""Memory-efficient attention in plain XLA: keys in blocks, an online softmax, a custom backward.

The reference (`layers._attend_xla`) builds float32 scores [B, K, G, T, S] per layer, and
autodiff keeps them (and the probabilities) for the backward pass of every layer: at
8 x 2048 tokens and 32 heads that is 4 GiB a layer. Here the keys are walked in blocks of
`block` under `lax.scan` with a running max and sum (the flash-attention recurrence), so the
forward holds one [B, K, G, T, block] block at a time and keeps only the output and the
per-query max and sum. The backward (`jax.custom_vjp`) recomputes each block's probabilities
from those instead of storing them: memory per layer is O(T * (H + block)), not
O(T * S), at the price of one more pair of score matmuls.

Semantics equal the reference exactly, including its edge cases: a masked key gets the same
finite `MASK_VALUE` score (so a query that sees no key, a padding row, gets a uniform softmax
over all S keys, never NaN), and keys added only to round S up to a whole block get -inf (they
exist in neither). This runs on every backend; `layers.attend` picks it on CPU (and on GPU when
cuDNN cannot take the inputs).

`attend_filled` is the same recurrence for cached prefill and decode, forward only: it walks
the key blocks of a stacked KV cache under a `fori_loop` bounded by the filled length, so a
decode step's cost follows the tokens in the cache, not the slots allocated for the budget.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Same value as layers._MASK_VALUE (imported there from here, so the two cannot drift).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
DEFAULT_BLOCK = 512


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array, *,
           scale: float, block: int = DEFAULT_BLOCK) -> jax.Array:
    """softmax(q k^T * scale, masked) v with grouped kv heads, keys walked in blocks.

    Args:
      q_BTNH: queries; N a multiple of K.
      k_BSKH, v_BSKH: keys and values.
      mask_BTS: bool, which keys each query sees.
      scale: the query scale.
      block: keys per block (S is padded up to a multiple of it).
    Returns:
      out_BTNH in the values' dtype.
    """
    s = k_BSKH.shape[1]
    block = max(1, min(block, s))
    pad = -(-s // block) * block - s
    if pad:
        k_BSKH = jnp.pad(k_BSKH, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_BSKH = jnp.pad(v_BSKH, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, 0), (0, pad)))
    return _flash(q_BTNH, k_BSKH, v_BSKH, mask_BTS.astype(bool), float(scale), block, s)


def _blocks(k_BSKH, v_BSKH, mask_BTS, block):
    """Key-block-major views: [nb, B, block, K, H] twice and [nb, B, T, block]."""
    b, sp, kh, h = k_BSKH.shape
    nb = sp // block
    k_nBbKH = k_BSKH.reshape(b, nb, block, kh, h).swapaxes(0, 1)
    v_nBbKH = v_BSKH.reshape(b, nb, block, kh, h).swapaxes(0, 1)
    mask_nBTb = mask_BTS.reshape(b, mask_BTS.shape[1], nb, block).transpose(2, 0, 1, 3)
    return k_nBbKH, v_nBbKH, mask_nBTb


def _scores(q_BTKGH, k_BbKH, mask_BTb, start, block, s_real, scale):
    s_BKGTb = jnp.einsum("BTKGH,BbKH->BKGTb", q_BTKGH, k_BbKH,
                         preferred_element_type=jnp.float32) * scale
    s_BKGTb = jnp.where(mask_BTb[:, None, None], s_BKGTb, MASK_VALUE)
    real_b = start + jnp.arange(block, dtype=jnp.int32) < s_real
    return jnp.where(real_b, s_BKGTb, -jnp.inf)


def _group(q_BTNH, kh):
    b, t, n, h = q_BTNH.shape
    return q_BTNH.reshape(b, t, kh, n // kh, h)


def _online_softmax_step(carry, s_BKGTb, v_BbKH):
    """One key block of the online softmax: (running max, denominator, weighted values)
    updated with the block's scores and values, all in float32."""
    m_BKGT, l_BKGT, acc_BKGTH = carry
    m_new = jnp.maximum(m_BKGT, jnp.max(s_BKGTb, axis=-1))
    corr_BKGT = jnp.exp(m_BKGT - m_new)
    p_BKGTb = jnp.exp(s_BKGTb - m_new[..., None])
    l_BKGT = l_BKGT * corr_BKGT + jnp.sum(p_BKGTb, axis=-1)
    acc_BKGTH = acc_BKGTH * corr_BKGT[..., None] + jnp.einsum(
        "BKGTb,BbKH->BKGTH", p_BKGTb, v_BbKH.astype(jnp.float32))
    return m_new, l_BKGT, acc_BKGTH


def _forward(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, block, s_real):
    b, t, n, h = q_BTNH.shape
    kh = k_BSKH.shape[2]
    q_BTKGH = _group(q_BTNH, kh)
    k_n, v_n, mask_n = _blocks(k_BSKH, v_BSKH, mask_BTS, block)
    starts = jnp.arange(k_n.shape[0], dtype=jnp.int32) * block

    def body(carry, xs):
        k_BbKH, v_BbKH, mask_BTb, start = xs
        s_BKGTb = _scores(q_BTKGH, k_BbKH, mask_BTb, start, block, s_real, scale)
        return _online_softmax_step(carry, s_BKGTb, v_BbKH), None

    g = n // kh
    init = (jnp.full((b, kh, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, kh, g, t, h), jnp.float32))
    (m_BKGT, l_BKGT, acc_BKGTH), _ = jax.lax.scan(body, init, (k_n, v_n, mask_n, starts))
    out_BKGTH = acc_BKGTH / l_BKGT[..., None]
    out_BTNH = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(v_BSKH.dtype)
    # The max and the sum, not m + log(l): next to MASK_VALUE (a padding row's max) log(l)
    # would be lost to float32 rounding, and the row's probabilities with it.
    return out_BTNH, (m_BKGT, l_BKGT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, block, s_real):
    return _forward(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, block, s_real)[0]


def _flash_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, block, s_real):
    out_BTNH, stats = _forward(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, block, s_real)
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, mask_BTS, out_BTNH, stats)


def _flash_bwd(scale, block, s_real, res, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, mask_BTS, out_BTNH, (m_BKGT, l_BKGT) = res
    b, t, n, h = q_BTNH.shape
    kh = k_BSKH.shape[2]
    q_BTKGH = _group(q_BTNH, kh)
    do_BTKGH = _group(dout_BTNH, kh).astype(jnp.float32)
    # delta = rowsum(dO * O): the softmax Jacobian's correction term, one scalar per query.
    delta_BKGT = jnp.einsum("BTKGH,BTKGH->BKGT", do_BTKGH,
                            _group(out_BTNH, kh).astype(jnp.float32))
    k_n, v_n, mask_n = _blocks(k_BSKH, v_BSKH, mask_BTS, block)
    starts = jnp.arange(k_n.shape[0], dtype=jnp.int32) * block

    def body(dq_BTKGH, xs):
        k_BbKH, v_BbKH, mask_BTb, start = xs
        s_BKGTb = _scores(q_BTKGH, k_BbKH, mask_BTb, start, block, s_real, scale)
        p_BKGTb = jnp.exp(s_BKGTb - m_BKGT[..., None]) / l_BKGT[..., None]
        dv_BbKH = jnp.einsum("BKGTb,BTKGH->BbKH", p_BKGTb, do_BTKGH)
        dp_BKGTb = jnp.einsum("BTKGH,BbKH->BKGTb", do_BTKGH, v_BbKH.astype(jnp.float32))
        # A masked score is a constant (MASK_VALUE): no gradient flows into q or k through it.
        ds_BKGTb = jnp.where(mask_BTb[:, None, None], p_BKGTb * (dp_BKGTb - delta_BKGT[..., None]),
                             0.0) * scale
        dq_BTKGH = dq_BTKGH + jnp.einsum("BKGTb,BbKH->BTKGH", ds_BKGTb,
                                         k_BbKH.astype(jnp.float32))
        dk_BbKH = jnp.einsum("BKGTb,BTKGH->BbKH", ds_BKGTb, q_BTKGH.astype(jnp.float32))
        return dq_BTKGH, (dk_BbKH, dv_BbKH)

    dq_BTKGH, (dk_n, dv_n) = jax.lax.scan(
        body, jnp.zeros(q_BTKGH.shape, jnp.float32), (k_n, v_n, mask_n, starts))
    sp = k_BSKH.shape[1]
    dk_BSKH = dk_n.swapaxes(0, 1).reshape(b, sp, kh, h).astype(k_BSKH.dtype)
    dv_BSKH = dv_n.swapaxes(0, 1).reshape(b, sp, kh, h).astype(v_BSKH.dtype)
    dq_BTNH = dq_BTKGH.reshape(b, t, n, h).astype(q_BTNH.dtype)
    return dq_BTNH, dk_BSKH, dv_BSKH, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# Keys per block of `attend_filled`: small enough that a decode step at a short length visits
# little beyond its filled slots, large enough that the loop's per-block overhead stays small.
FILLED_BLOCK = 128


def attend_filled(q_BTNH: jax.Array, k_LBSKH: jax.Array, v_LBSKH: jax.Array,
                  mask_BTS: jax.Array, *, layer: jax.Array, q_start: jax.Array, scale: float,
                  window: int | None = None, block: int = FILLED_BLOCK) -> jax.Array:
    """Cached attention that reads only the cache's filled slots, for prefill and decode.

    The T queries sit at slots [q_start, q_start + T) of a cache whose slots [0, q_start + T)
    are written (the loop's shared index: every row's prompt is left-padded to it). Key blocks
    of `block` slots are visited by a `lax.fori_loop` from the first block the sliding window
    reaches to ceil((q_start + T) / block), with the online softmax of `attend`, so the cost
    follows the filled length, not the cache's allocation. Blocks are sliced straight out of
    the stacked cache: the layer's [B, S, K, H] slice is never materialised.

    A real query (one that sees at least itself) gets exactly the reference's softmax: the
    slots skipped are ones it cannot see (after the filled length, or before its window),
    whose reference weight exp(MASK_VALUE - max) is 0 in float32. A query that sees no key (a
    padding slot, whose output nobody reads) gets a uniform softmax over the visited slots
    rather than over all S.

    Args:
      q_BTNH: queries; N a multiple of K.
      k_LBSKH, v_LBSKH: the whole stacked cache, this call's keys and values already written.
      mask_BTS: bool, which keys each query sees (all S slots).
      layer: int32 scalar, the layer's index in the stack.
      q_start: int32 scalar, the slot of the first query; or int32 [B], per row (each row
        attends over its own first q_start + T slots).
      scale: the query scale.
      window: the sliding window (a query sees keys less than `window` slots back), or None.
      block: keys per block (at most S; a last block that would run past S is shifted back
        and its slots already visited are skipped).
    Returns:
      out_BTNH in the values' dtype.
    """
    _, b, s, kh, h = k_LBSKH.shape
    t, n = q_BTNH.shape[1], q_BTNH.shape[2]
    g = n // kh
    block = max(1, min(block, s))
    dtype = q_BTNH.dtype
    q_BTKGH = _group(q_BTNH, kh)
    q_start = jnp.asarray(q_start, jnp.int32)
    # A per-row q_start [B] (continuous batching): each row's filled length is its own, the
    # loop runs to the longest; blocks past a row's length get -inf scores for that row.
    kv_len_B1 = jnp.reshape(q_start + t, (-1, 1))
    first = jnp.int32(0)
    if window is not None:
        first = jnp.maximum(jnp.min(q_start) - (window - 1), 0) // block
    last = (jnp.max(kv_len_B1) + block - 1) // block
    layer = jnp.asarray(layer, jnp.int32)
    zero = jnp.zeros((), jnp.int32)

    def body(i, carry):
        lo = i * block
        # The last block may be shifted back to end at S; its slots before `lo` were visited.
        start = jnp.minimum(lo, s - block)
        k_BbKH, v_BbKH = (
            jax.lax.dynamic_slice(c, (layer, zero, start, zero, zero), (1, b, block, kh, h))[0]
            .astype(dtype) for c in (k_LBSKH, v_LBSKH))
        mask_BTb = jax.lax.dynamic_slice_in_dim(mask_BTS, start, block, axis=2)
        slot_b = start + jnp.arange(block, dtype=jnp.int32)
        fresh_Bb = (slot_b >= lo) & (slot_b < kv_len_B1)  # [1 or B, block]
        # Slots past the filled length may hold anything (stale rows, NaN): zero weight is not
        # enough (0 * NaN), so their values are zeroed and their scores are -inf.
        v_BbKH = jnp.where(fresh_Bb[:, :, None, None], v_BbKH, 0)
        s_BKGTb = jnp.einsum("BTKGH,BbKH->BKGTb", q_BTKGH, k_BbKH,
                             preferred_element_type=jnp.float32) * scale
        s_BKGTb = jnp.where(mask_BTb[:, None, None], s_BKGTb, MASK_VALUE)
        s_BKGTb = jnp.where(fresh_Bb[:, None, None, None, :], s_BKGTb, -jnp.inf)
        return _online_softmax_step(carry, s_BKGTb, v_BbKH)

    init = (jnp.full((b, kh, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, kh, g, t, h), jnp.float32))
    # The first visited block holds a slot in [lo, kv_len) of every row (a row's window starts
    # at or after it), so each running max is finite from the first block on: no
    # exp(-inf - -inf); later blocks wholly past a row's length leave its sums unchanged.
    _, l_BKGT, acc_BKGTH = jax.lax.fori_loop(first, last, body, init)
    out_BKGTH = acc_BKGTH / l_BKGT[..., None]
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(dtype)
