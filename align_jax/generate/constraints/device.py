"""The constraint tables on the device, and what the decode loop does with them each step.

All constraints of one `generate` call share one table (Q states, M masks); each row carries
its state (int32 [B]). State 0 is FREE (an unconstrained row: every token allowed, every byte
loops back) and state 1 is DEAD (nothing allowed); constraint c's states follow at an offset.
Per step, inside the jitted loop and with no host round trip:
  allowed_BV = the row's packed mask, unpacked; stop ids only (and exactly) in accepting states;
  logits outside it are -inf before sampling (penalties, temperature, top-k/p, min-p see that);
  after the draw, the token's bytes are walked through the byte DFA (a few gathers of [B]).
Q and M are rounded up to powers of two so calls with different constraints share compiled
code.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from align_jax.generate.constraints.automaton import DEAD, CompiledConstraint

FREE, DEAD_STATE = 0, 1


@flax.struct.dataclass
class Tables:
    """delta_QY int32 [Q, 256]; accepting_Q bool [Q]; mask_id_Q int32 [Q]; masks_MW uint32
    [M, W] (W = ceil(V / 32)); bytes_VL uint8 [V, L] and len_V int32 [V]: each token's bytes."""

    delta_QY: jax.Array
    accepting_Q: jax.Array
    mask_id_Q: jax.Array
    masks_MW: jax.Array
    bytes_VL: jax.Array
    len_V: jax.Array


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def build_tables(compiled: list[CompiledConstraint], *, vocab_size: int
                 ) -> tuple[Tables, dict]:
    """Host numpy tables for the union of `compiled` (all of one tokenizer).

    Args:
      compiled: distinct compiled constraints.
      vocab_size: the model's vocabulary (logit) size; ids beyond the tokenizer's are never
        allowed in a constrained row.
    Returns:
      (Tables of numpy arrays, {constraint: its start state}).
    """
    table = compiled[0].table
    words = -(-vocab_size // 32)
    n_states = 2 + sum(len(c.delta_QY) for c in compiled)
    n_masks = 2 + sum(len(c.masks_MW) for c in compiled)
    q, m = _pow2(n_states), _pow2(n_masks)
    delta = np.full((q, 256), DEAD_STATE, np.int32)
    delta[FREE] = FREE
    accepting = np.zeros(q, bool)
    accepting[FREE] = True
    mask_id = np.full(q, 1, np.int32)
    mask_id[FREE] = 0
    masks = np.zeros((m, words), np.uint32)
    masks[0] = np.uint32(0xFFFFFFFF)
    starts, s0, m0 = {}, 2, 2
    for c in compiled:
        n = len(c.delta_QY)
        delta[s0:s0 + n] = np.where(c.delta_QY == DEAD, DEAD_STATE, c.delta_QY + s0)
        accepting[s0:s0 + n] = c.accepting_Q
        mask_id[s0:s0 + n] = c.mask_id_Q + m0
        w = min(words, c.masks_MW.shape[1])
        masks[m0:m0 + len(c.masks_MW), :w] = c.masks_MW[:, :w]
        starts[c.constraint] = s0
        s0, m0 = s0 + n, m0 + len(c.masks_MW)
    rows = min(vocab_size, len(table.len_V))
    bytes_vl = np.zeros((vocab_size, table.max_len), np.uint8)
    bytes_vl[:rows] = table.bytes_VL[:rows]
    lens = np.zeros(vocab_size, np.int32)
    lens[:rows] = table.len_V[:rows]
    return Tables(delta_QY=delta, accepting_Q=accepting, mask_id_Q=mask_id, masks_MW=masks,
                  bytes_VL=bytes_vl, len_V=lens), starts


def allowed(tables: Tables, state_B: jax.Array, stop_ids_E: jax.Array, vocab_size: int
            ) -> jax.Array:
    """bool [B, V]: the tokens each row may draw next."""
    words_BW = tables.masks_MW[tables.mask_id_Q[state_B]]
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits_BV = ((words_BW[:, :, None] >> shifts) & 1).astype(bool)
    bits_BV = bits_BV.reshape(state_B.shape[0], -1)[:, :vocab_size]
    # -1 entries pad the stop set: sent out of range and dropped.
    ids_E = jnp.where(stop_ids_E >= 0, stop_ids_E, vocab_size)
    is_stop_V = jnp.zeros((vocab_size,), bool).at[ids_E].set(True, mode="drop")
    accept_B1 = tables.accepting_Q[state_B][:, None]
    return jnp.where(is_stop_V[None, :], accept_B1, bits_BV)


def advance(tables: Tables, state_B: jax.Array, tokens_B: jax.Array, keep_B: jax.Array
            ) -> jax.Array:
    """The states after each row's drawn token (rows with keep_B stay where they are)."""
    bytes_BL = tables.bytes_VL[tokens_B].astype(jnp.int32)
    len_B = tables.len_V[tokens_B]

    def body(carry):
        k, s_B = carry
        nxt_B = tables.delta_QY[s_B, bytes_BL[:, jnp.minimum(k, bytes_BL.shape[1] - 1)]]
        return k + 1, jnp.where(k < len_B, nxt_B, s_B)

    # Walk only as many bytes as the longest drawn token has (most tokens are short).
    _, new_B = jax.lax.while_loop(lambda c: c[0] < jnp.max(len_B), body,
                                  (jnp.int32(0), state_B))
    return jnp.where(keep_B, state_B, new_B)
