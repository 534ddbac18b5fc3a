"""Per-token and per-sequence log-probabilities, always in float32.

Convention shared by every loss: targets are already shifted, so the logits at position t
score `targets[..., t]`; a mask of 0 means "not scored". Padding (segment id 0) is never scored.

Two ways to get token log-probs from a model:
  * full logits [B, T, V] from `models.transformer.forward` (simple, V-sized memory per token);
  * `chunked_token_logps` on the final hidden states, which walks the vocabulary in chunks with a
    running log-sum-exp, so a float32 [B, T, V] tensor never exists at once (large vocabularies).
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from align_jax.models import transformer
from align_jax.models.config import ModelConfig

Batch = Mapping[str, Any]

# `vocab_chunk_size=0` (the default) walks the vocabulary in chunks of AUTO_CHUNK above
# AUTO_CHUNK_ABOVE entries: at Llama 3's 128k vocabulary, 8 x 2048 tokens of float32 logits
# are 8 GiB, and the log-softmax keeps a second copy for the backward pass.
AUTO_CHUNK_ABOVE = 32_768
AUTO_CHUNK = 16_384


def resolve_vocab_chunk(vocab_size: int, vocab_chunk_size: int) -> int:
    """The chunk size `forward_token_logps` uses: 0 for full logits.

    Args:
      vocab_size: V.
      vocab_chunk_size: > 0 that chunk; 0 automatic (chunks above AUTO_CHUNK_ABOVE);
        < 0 full logits always.
    """
    if vocab_chunk_size > 0:
        return vocab_chunk_size
    if vocab_chunk_size == 0 and vocab_size > AUTO_CHUNK_ABOVE:
        return AUTO_CHUNK
    return 0


def token_logps(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(targets[t] | logits[t]) in float32.

    Args:
      logits_BTV: logits (any float dtype, any leading dims before V).
      targets_BT: int targets with the logits' shape minus the last axis.
    Returns:
      logps_BT: float32.
    """
    if logits_BTV.shape[:-1] != targets_BT.shape:
        raise ValueError(f"token_logps: logits shape {logits_BTV.shape} does not match targets "
                         f"shape {targets_BT.shape} (expected logits = targets + [V])")
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(
        logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_BT - lse_BT


def _masked_reduce(logps_BT: jax.Array, mask_BT: jax.Array, average: bool) -> jax.Array:
    # `where`, not a product: a masked position's cotangent is then exactly 0 even if its
    # log-prob is -inf or nan (e.g. garbage logits on padding).
    mask_BT = mask_BT.astype(jnp.float32)
    total_B = jnp.sum(jnp.where(mask_BT > 0, logps_BT * mask_BT, 0.0), axis=-1)
    if not average:
        return total_B
    return total_B / jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)


def sequence_logps(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, *,
                   average: bool = False) -> jax.Array:
    """Per-sequence log-probability, summed (or averaged) over scored tokens, in float32.

    Args:
      logits_BTV: logits; position t scores targets_BT[:, t] (the caller has already shifted).
      targets_BT: int targets.
      mask_BT: 1 where the target is scored, 0 elsewhere (float or bool).
      average: divide by the number of scored tokens (0 for a sequence with none).
    Returns:
      logps_B: float32.
    """
    if mask_BT.shape != targets_BT.shape:
        raise ValueError(f"sequence_logps: mask shape {mask_BT.shape} != targets shape "
                         f"{targets_BT.shape}")
    return _masked_reduce(token_logps(logits_BTV, targets_BT), mask_BT, average)


def chunked_token_logps(hidden_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, *,
                        chunk_size: int) -> jax.Array:
    """`token_logps(hidden @ w, targets)` without materialising the [B, T, V] logits.

    The vocabulary is split into ceil(V / chunk_size) chunks (the last one padded and masked);
    each chunk's log-sum-exp is computed under `jax.checkpoint`, so neither the forward nor the
    backward pass keeps more than one [B, T, chunk_size] float32 block alive.

    Args:
      hidden_BTD: final-normed hidden states (from `transformer.forward_hidden`).
      w_DV: the output projection.
      targets_BT: int targets.
      chunk_size: vocabulary entries per chunk (any positive int; need not divide V).
    Returns:
      logps_BT: float32.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunked_token_logps: chunk_size must be positive, got {chunk_size}")
    d, v = w_DV.shape
    if hidden_BTD.shape[-1] != d or hidden_BTD.shape[:-1] != targets_BT.shape:
        raise ValueError(f"chunked_token_logps: hidden {hidden_BTD.shape}, w {w_DV.shape} and "
                         f"targets {targets_BT.shape} do not fit [B,T,D] x [D,V] -> [B,T]")
    chunk_size = min(chunk_size, v)
    n_chunks = -(-v // chunk_size)
    w_DV = jnp.pad(w_DV, ((0, 0), (0, n_chunks * chunk_size - v)))
    w_NDc = w_DV.reshape(d, n_chunks, chunk_size).transpose(1, 0, 2)
    starts_N = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_size

    @jax.checkpoint
    def chunk_lse(args):
        w_Dc, start = args
        logits_BTc = jnp.einsum("BTD,Dc->BTc", hidden_BTD, w_Dc,
                                preferred_element_type=jnp.float32)
        real_c = start + jnp.arange(chunk_size, dtype=jnp.int32) < v
        logits_BTc = jnp.where(real_c, logits_BTc, -jnp.inf)
        return jax.nn.logsumexp(logits_BTc, axis=-1)

    lse_NBT = jax.lax.map(chunk_lse, (w_NDc, starts_N))
    lse_BT = jax.nn.logsumexp(lse_NBT, axis=0)
    # The target logit directly: one D-vector per token, no V-sized intermediate.
    w_BTD = jnp.take(w_DV.T, targets_BT.astype(jnp.int32), axis=0)
    target_BT = jnp.einsum("BTD,BTD->BT", hidden_BTD, w_BTD, preferred_element_type=jnp.float32)
    return target_BT - lse_BT


def batch_field(batch: Batch, key: str, *, where: str) -> jax.Array:
    """batch[key] as an array, or a KeyError that names the field and the caller `where`."""
    if key not in batch:
        raise KeyError(f"{where}: batch has no field {key!r} (fields: {sorted(batch)})")
    return jnp.asarray(batch[key])


def forward_token_logps(config: ModelConfig, params, batch: Batch, *, prefix: str = "",
                        vocab_chunk_size: int = 0,
                        where: str = "forward_token_logps") -> tuple[jax.Array, jax.Array]:
    """Scored token log-probs of a batch under the model, one forward pass over all rows.

    Reads `{prefix}tokens`, `{prefix}targets`, `{prefix}loss_mask` and, when present,
    `{prefix}positions` and `{prefix}segment_ids`, all shaped [..., T]; leading dims are flattened
    into the model's batch axis and restored.

    Args:
      config: the model.
      params: its parameters.
      batch: the batch dict (see the module docstring of `align_jax.losses`).
      prefix: key prefix, e.g. "kl_" for the KTO mismatched pairs.
      vocab_chunk_size: > 0 `chunked_token_logps` with this chunk size; 0 automatic (chunked
        above AUTO_CHUNK_ABOVE vocabulary entries, see `resolve_vocab_chunk`); < 0 full logits.
      where: the caller's name, used in error messages.
    Returns:
      (logps [..., T] float32, zero where not scored; mask [..., T] float32).
    """
    tokens = batch_field(batch, prefix + "tokens", where=where)
    targets = batch_field(batch, prefix + "targets", where=where)
    mask = batch_field(batch, prefix + "loss_mask", where=where).astype(jnp.float32)
    lead, t = tokens.shape[:-1], tokens.shape[-1]
    for key, arr in ((prefix + "targets", targets), (prefix + "loss_mask", mask)):
        if arr.shape != tokens.shape:
            raise ValueError(f"{where}: field {key!r} has shape {arr.shape}, expected "
                             f"{tokens.shape} like {prefix}tokens")
    flat = lambda x: None if x is None else jnp.asarray(x).reshape(-1, t)  # noqa: E731
    segment_ids = batch.get(prefix + "segment_ids")
    positions = batch.get(prefix + "positions")
    tokens_BT, targets_BT, mask_BT = flat(tokens), flat(targets), flat(mask)
    segment_ids_BT, positions_BT = flat(segment_ids), flat(positions)
    if segment_ids_BT is not None:
        # Padding is never scored, whatever the mask says.
        mask_BT = jnp.where(segment_ids_BT != 0, mask_BT, 0.0)
    vocab_chunk_size = resolve_vocab_chunk(config.vocab_size, vocab_chunk_size)
    if vocab_chunk_size:
        h_BTD, w_DV = transformer.forward_hidden(
            config, params, tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)
        logps_BT = chunked_token_logps(h_BTD, w_DV, targets_BT, chunk_size=vocab_chunk_size)
    else:
        logits_BTV = transformer.forward(
            config, params, tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)
        logps_BT = token_logps(logits_BTV, targets_BT)
    logps_BT = jnp.where(mask_BT > 0, logps_BT, 0.0)
    return logps_BT.reshape(*lead, t), mask_BT.reshape(*lead, t)


def masked_sum(logps_BT: jax.Array, mask_BT: jax.Array, *, average: bool = False) -> jax.Array:
    """Sum (or mean) of token log-probs over scored positions along the last axis, float32.

    Args:
      logps_BT: token log-probs [..., T].
      mask_BT: 1 where scored.
      average: divide by the number of scored tokens (0 for a row with none).
    Returns:
      logps_B: [...] float32.
    """
    return _masked_reduce(logps_BT.astype(jnp.float32), mask_BT, average)
