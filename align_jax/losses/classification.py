"""Sequence classification (the aligner squad's inspectors): cross-entropy over K classes."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from align_jax.losses import logprobs


def classification_loss(logits_BK: jax.Array, labels_B: jax.Array, *,
                        mask_B: jax.Array | None = None):
    """Mean cross-entropy and accuracy; labels < 0 are ignored (batch padding).

    Args:
      logits_BK: class logits (any float dtype; computed in float32).
      labels_B: int class ids in [0, K), or < 0 to ignore the row.
      mask_B: optional extra row weights (0 = ignore).
    Returns:
      (loss, {"loss", "accuracy", "num_examples"}).
    """
    if logits_BK.ndim != 2 or labels_B.shape != logits_BK.shape[:1]:
        raise ValueError(f"classification_loss: expected logits [B, K] and labels [B], got "
                         f"{logits_BK.shape} and {labels_B.shape}")
    logits_BK = logits_BK.astype(jnp.float32)
    labels_B = labels_B.astype(jnp.int32)
    w_B = (labels_B >= 0).astype(jnp.float32)
    if mask_B is not None:
        w_B = w_B * mask_B.astype(jnp.float32)
    safe_B = jnp.clip(labels_B, 0, logits_BK.shape[1] - 1)
    target_B = jnp.take_along_axis(logits_BK, safe_B[:, None], axis=1)[:, 0]
    nll_B = jax.nn.logsumexp(logits_BK, axis=1) - target_B
    n = jnp.sum(w_B)
    loss = jnp.sum(jnp.where(w_B > 0, nll_B * w_B, 0.0)) / jnp.maximum(n, 1.0)
    correct_B = (jnp.argmax(logits_BK, axis=1) == labels_B).astype(jnp.float32)
    accuracy = jnp.sum(correct_B * w_B) / jnp.maximum(n, 1.0)
    return loss, {"loss": loss, "accuracy": accuracy, "num_examples": n}


def classification_objective(params, batch, *, apply_fn: Callable):
    """Classification training loss for any model.

    Args:
      params: model parameters (differentiated).
      batch: {"tokens", "segment_ids", "positions": [B, T], "labels": [B]}.
      apply_fn: apply_fn(params, batch) -> logits [B, K] (e.g. the encoder's classifier head).
    Returns:
      (loss, {"loss", "accuracy", "num_examples"}).
    """
    labels_B = logprobs.batch_field(batch, "labels", where="classification_objective")
    return classification_loss(apply_fn(params, batch), labels_B)
