"""Next-token negative log-likelihood: SFT (completion tokens only) and causal LM (all tokens).

Both read the LM batch {"tokens", "targets", "loss_mask", "positions", "segment_ids"} [B, T],
packed or padded, and average over every scored token in the batch (not per sequence), so a
packed batch and the padded batch of the same examples give the same loss.
"""

import jax
import jax.numpy as jnp

from align_jax.losses import logprobs
from align_jax.models.config import ModelConfig


def _nll_from_token_logps(logps_BT: jax.Array, mask_BT: jax.Array):
    mask_BT = mask_BT.astype(jnp.float32)
    num_tokens = jnp.sum(mask_BT)
    total = logprobs.masked_sum(logps_BT.reshape(1, -1), mask_BT.reshape(1, -1))[0]
    loss = -total / jnp.maximum(num_tokens, 1.0)
    return loss, {"loss": loss, "num_tokens": num_tokens}


def nll_loss(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array):
    """Mean next-token NLL over the scored tokens of a batch, from logits.

    Args:
      logits_BTV: logits; position t scores targets_BT[:, t].
      targets_BT: int targets (already shifted).
      mask_BT: 1 where the target is scored.
    Returns:
      (loss, {"loss", "num_tokens"}); the loss is 0 when nothing is scored.
    """
    return _nll_from_token_logps(logprobs.token_logps(logits_BTV, targets_BT), mask_BT)


def sft_loss(params, batch, *, config: ModelConfig, vocab_chunk_size: int = 0):
    """Supervised fine-tuning: NLL of the completion tokens (`loss_mask`), packed or padded.

    Args:
      params: model parameters (differentiated).
      batch: LM batch [B, T]; `loss_mask` is 1 on completion targets only.
      config: the model.
      vocab_chunk_size: see `logprobs.forward_token_logps` (0: automatic, <0: full logits).
    Returns:
      (loss, {"loss", "num_tokens", "perplexity"}).
    """
    logps_BT, mask_BT = logprobs.forward_token_logps(
        config, params, batch, vocab_chunk_size=vocab_chunk_size, where="sft_loss")
    loss, metrics = _nll_from_token_logps(logps_BT, mask_BT)
    return loss, {**metrics, "perplexity": jnp.exp(loss)}


def lm_loss(params, batch, *, config: ModelConfig, vocab_chunk_size: int = 0):
    """Causal LM on raw text ("continual fine-tuning"): NLL of every real token.

    Same computation as `sft_loss`; without a `loss_mask` field every non-padding position
    (segment id != 0) is scored. The data pipeline's `loss_mask`, when present, is trusted to
    exclude targets that cross a segment boundary.

    Args:
      params: model parameters.
      batch: LM batch [B, T] ("loss_mask" optional).
      config: the model.
      vocab_chunk_size: see `sft_loss`.
    Returns:
      (loss, {"loss", "num_tokens", "perplexity"}).
    """
    if "loss_mask" not in batch:
        if "segment_ids" not in batch:
            raise KeyError("lm_loss: batch needs 'loss_mask' or 'segment_ids' to know which "
                           f"tokens are real (fields: {sorted(batch)})")
        batch = {**batch, "loss_mask": (jnp.asarray(batch["segment_ids"]) != 0)}
    return sft_loss(params, batch, config=config, vocab_chunk_size=vocab_chunk_size)
