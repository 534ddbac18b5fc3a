"""SAMI: the two-sided InfoNCE loss over constitutions and responses (Fränken et al. 2024,
"Self-Supervised Alignment with Mutual Information", Eq. 2 and Figure 5).

Per query, entry [i, j] of the C x C matrix is log p(y_j | x, c_i): row i is constitution i,
column j is the response sampled under constitution j, so the diagonal holds matched pairs.
The loss is the mean of two cross-entropies against the identity: one normalised over
responses (softmax along j) and one normalised over constitutions (softmax along i).
"""

import math

import jax
import jax.numpy as jnp

from align_jax.losses import logprobs
from align_jax.models.config import ModelConfig


def _wmean(x: jax.Array, w: jax.Array | None) -> jax.Array:
    if w is None:
        return jnp.mean(x)
    w = w.astype(jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def sami_loss(logps_BCC: jax.Array, *, mask_B: jax.Array | None = None):
    """Two-sided SAMI loss, averaged over queries.

    Args:
      logps_BCC: [B, C, C] float; [b, i, j] = log p(response j | query b, constitution i).
      mask_B: 1 for real queries, 0 for batch padding.
    Returns:
      (loss, metrics: loss, loss_responses (row-normalised term), loss_constitutions
      (column-normalised term), diagonal_mean, off_diagonal_mean, accuracy (how often the
      matched entry is the largest, averaged over both directions), accuracy_responses,
      accuracy_constitutions, mi_bound (log C - loss, the InfoNCE lower bound in nats)).
    """
    if logps_BCC.ndim != 3 or logps_BCC.shape[1] != logps_BCC.shape[2]:
        raise ValueError(f"sami_loss: expected logps [B, C, C], got {logps_BCC.shape}")
    c = logps_BCC.shape[1]
    x_BCC = logps_BCC.astype(jnp.float32)
    diag = lambda m_BCC: jnp.diagonal(m_BCC, axis1=1, axis2=2)  # noqa: E731
    over_responses_BC = diag(jax.nn.log_softmax(x_BCC, axis=2))
    over_constitutions_BC = diag(jax.nn.log_softmax(x_BCC, axis=1))
    loss_rows_B = -jnp.mean(over_responses_BC, axis=1)
    loss_cols_B = -jnp.mean(over_constitutions_BC, axis=1)
    loss = _wmean(0.5 * (loss_rows_B + loss_cols_B), mask_B)

    x_BCC = jax.lax.stop_gradient(x_BCC)
    eye_CC = jnp.eye(c, dtype=bool)
    arange_C = jnp.arange(c)
    acc_rows_B = jnp.mean(jnp.argmax(x_BCC, axis=2) == arange_C, axis=1)
    acc_cols_B = jnp.mean(jnp.argmax(x_BCC, axis=1) == arange_C, axis=1)
    off_B = (jnp.sum(jnp.where(eye_CC, 0.0, x_BCC), axis=(1, 2)) / max(c * c - c, 1))
    metrics = {
        "loss": loss,
        "loss_responses": _wmean(loss_rows_B, mask_B),
        "loss_constitutions": _wmean(loss_cols_B, mask_B),
        "diagonal_mean": _wmean(jnp.mean(diag(x_BCC), axis=1), mask_B),
        "off_diagonal_mean": _wmean(off_B, mask_B),
        "accuracy": _wmean(0.5 * (acc_rows_B + acc_cols_B), mask_B),
        "accuracy_responses": _wmean(acc_rows_B, mask_B),
        "accuracy_constitutions": _wmean(acc_cols_B, mask_B),
        "mi_bound": math.log(c) - jax.lax.stop_gradient(loss),
    }
    return loss, metrics


def sami_logps(config: ModelConfig, params, batch, *, vocab_chunk_size: int = 0):
    """The [B, C, C] matrix of mean-over-response-token log-probs, one forward pass.

    Args:
      config: the model.
      params: its parameters.
      batch: SAMI batch, keys [B, C, C, T]; loss_mask covers response tokens only.
      vocab_chunk_size: see `logprobs.forward_token_logps` (0: automatic, <0: full logits).
    Returns:
      (logps_BCC float32, query mask_B: 1 where the query has any scored token).
    """
    tokens = logprobs.batch_field(batch, "tokens", where="sami")
    if tokens.ndim != 4 or tokens.shape[1] != tokens.shape[2]:
        raise ValueError(f"sami: field 'tokens' must be [B, C, C, T], got {tokens.shape}")
    logps_BCCT, mask_BCCT = logprobs.forward_token_logps(
        config, params, batch, vocab_chunk_size=vocab_chunk_size, where="sami")
    logps_BCC = logprobs.masked_sum(logps_BCCT, mask_BCCT, average=True)
    mask_B = (jnp.sum(mask_BCCT, axis=(1, 2, 3)) > 0).astype(jnp.float32)
    return logps_BCC, mask_B


def sami_kl_penalty(logps_BCC: jax.Array, ref_logps_BCC: jax.Array, *,
                    mask_B: jax.Array | None = None) -> jax.Array:
    """Sample estimate of KL(p_model(y|x,c) || p_base(y|x,c)) per response token: the mean over
    queries and matched pairs (the diagonal, response j under its own constitution j) of the
    per-token log-ratio log p_model - log p_base. The base's log-probs carry no gradient."""
    diag = lambda m_BCC: jnp.diagonal(m_BCC, axis1=1, axis2=2)  # noqa: E731
    ratio_BC = (diag(logps_BCC.astype(jnp.float32))
                - jax.lax.stop_gradient(diag(ref_logps_BCC.astype(jnp.float32))))
    return _wmean(jnp.mean(ratio_BC, axis=1), mask_B)


def sami_objective(params, batch, *, config: ModelConfig, ref_params=None,
                   kl_coef: float = 0.0, vocab_chunk_size: int = 0):
    """SAMI training loss on a [B, C, C, T] batch.

    Args:
      params: parameters (differentiated).
      batch: SAMI batch (see `sami_logps`).
      config: the model.
      ref_params: the frozen initial parameters (train_main's "params" reference), used by the
        KL regulariser only.
      kl_coef: weight of `sami_kl_penalty` to the initial model (the paper's optional
        regulariser; 0 turns it off and needs no reference).
      vocab_chunk_size: see `sami_logps`.
    Returns:
      (loss, metrics of `sami_loss`, plus `kl` when kl_coef > 0).
    """
    logps_BCC, mask_B = sami_logps(config, params, batch, vocab_chunk_size=vocab_chunk_size)
    loss, metrics = sami_loss(logps_BCC, mask_B=mask_B)
    if kl_coef:
        if ref_params is None:
            raise ValueError("sami: kl_coef > 0 needs the frozen initial params (reference)")
        ref_BCC, _ = sami_logps(config, ref_params, batch, vocab_chunk_size=vocab_chunk_size)
        kl = sami_kl_penalty(logps_BCC, ref_BCC, mask_B=mask_B)
        loss = loss + kl_coef * kl
        metrics = {**metrics, "loss": loss, "kl": jax.lax.stop_gradient(kl)}
    return loss, metrics
