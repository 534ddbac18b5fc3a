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


def _forward(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, block, s_real):
    b, t, n, h = q_BTNH.shape
    kh = k_BSKH.shape[2]
    q_BTKGH = _group(q_BTNH, kh)
    k_n, v_n, mask_n = _blocks(k_BSKH, v_BSKH, mask_BTS, block)
    starts = jnp.arange(k_n.shape[0], dtype=jnp.int32) * block

    def body(carry, xs):
        m_BKGT, l_BKGT, acc_BKGTH = carry
        k_BbKH, v_BbKH, mask_BTb, start = xs
        s_BKGTb = _scores(q_BTKGH, k_BbKH, mask_BTb, start, block, s_real, scale)
        m_new = jnp.maximum(m_BKGT, jnp.max(s_BKGTb, axis=-1))
        corr_BKGT = jnp.exp(m_BKGT - m_new)
        p_BKGTb = jnp.exp(s_BKGTb - m_new[..., None])
        l_BKGT = l_BKGT * corr_BKGT + jnp.sum(p_BKGTb, axis=-1)
        acc_BKGTH = acc_BKGTH * corr_BKGT[..., None] + jnp.einsum(
            "BKGTb,BbKH->BKGTH", p_BKGTb, v_BbKH.astype(jnp.float32))
        return (m_new, l_BKGT, acc_BKGTH), None

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
