"""SAMI: the two-sided InfoNCE loss over constitutions and responses (Fränken et al. 2024,
"Self-Supervised Alignment with Mutual Information", Eq. 2 and Figure 5).

Per query, entry [i, j] of the C x C matrix is log p(y_j | x, c_i): row i is constitution i,
column j is the response sampled under constitution j, so the diagonal holds matched pairs.
The loss is the mean of two cross-entropies against the identity: one normalised over
responses (softmax along j) and one normalised over constitutions (softmax along i).

The optional regulariser (`kl_coef`) is the KL divergence from the frozen initial (base)
model at every response position, over the whole vocabulary:
    KL_t = sum_v p(v | ctx_t) (log p(v | ctx_t) - log p_base(v | ctx_t)),
averaged over a query's response tokens (all C x C rows) and then over queries, as the
SAMI reference code's trainer regularises (its kl_divergence). Its gradient is a true KL
gradient (zero where the model equals the base), unlike a log-ratio on the sampled tokens.
"""

import math

import jax
import jax.numpy as jnp

from align_jax.losses import logprobs
from align_jax.models import transformer
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


def token_logps_and_kl(h_BTD: jax.Array, w_DV: jax.Array, ref_h_BTD: jax.Array,
                       ref_w_DV: jax.Array, targets_BT: jax.Array, *, chunk_size: int = 0
                       ) -> tuple[jax.Array, jax.Array]:
    """Target log-probs of the model and its per-position KL from a reference model.

    Args:
      h_BTD, w_DV: the model's final hidden states and output projection
        (`transformer.forward_hidden`); logits = h @ w.
      ref_h_BTD, ref_w_DV: the same for the reference model (no gradient flows to them).
      targets_BT: int targets.
      chunk_size: > 0 walks the vocabulary in chunks of this size (two passes, each chunk
        under jax.checkpoint), so no [B, T, V] float32 tensor exists; 0 uses full logits.
    Returns:
      (logps_BT: log p(target_t), kl_BT: KL(p(. | ctx_t) || p_ref(. | ctx_t))), float32.
    """
    ref_h_BTD = jax.lax.stop_gradient(ref_h_BTD)
    ref_w_DV = jax.lax.stop_gradient(ref_w_DV)
    d, v = w_DV.shape
    if chunk_size <= 0 or chunk_size >= v:
        z_BTV = jnp.einsum("BTD,DV->BTV", h_BTD, w_DV, preferred_element_type=jnp.float32)
        zr_BTV = jnp.einsum("BTD,DV->BTV", ref_h_BTD, ref_w_DV,
                            preferred_element_type=jnp.float32)
        lp_BTV = jax.nn.log_softmax(z_BTV, axis=-1)
        lq_BTV = jax.nn.log_softmax(zr_BTV, axis=-1)
        kl_BT = jnp.sum(jnp.exp(lp_BTV) * (lp_BTV - lq_BTV), axis=-1)
        logps_BT = jnp.take_along_axis(lp_BTV, targets_BT[..., None].astype(jnp.int32),
                                       axis=-1)[..., 0]
        return logps_BT, kl_BT
    n_chunks = -(-v // chunk_size)
    pad = ((0, 0), (0, n_chunks * chunk_size - v))
    w_NDc = jnp.pad(w_DV, pad).reshape(d, n_chunks, chunk_size).transpose(1, 0, 2)
    wr_NDc = jnp.pad(ref_w_DV, pad).reshape(d, n_chunks, chunk_size).transpose(1, 0, 2)
    starts_N = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_size

    def logits(w_Dc, wr_Dc, start):
        z_BTc = jnp.einsum("BTD,Dc->BTc", h_BTD, w_Dc, preferred_element_type=jnp.float32)
        zr_BTc = jnp.einsum("BTD,Dc->BTc", ref_h_BTD, wr_Dc, preferred_element_type=jnp.float32)
        return z_BTc, zr_BTc, start + jnp.arange(chunk_size, dtype=jnp.int32) < v

    @jax.checkpoint
    def chunk_lse(args):
        z_BTc, zr_BTc, real_c = logits(*args)
        return (jax.nn.logsumexp(jnp.where(real_c, z_BTc, -jnp.inf), axis=-1),
                jax.nn.logsumexp(jnp.where(real_c, zr_BTc, -jnp.inf), axis=-1))

    lse_NBT, lser_NBT = jax.lax.map(chunk_lse, (w_NDc, wr_NDc, starts_N))
    lse_BT = jax.nn.logsumexp(lse_NBT, axis=0)
    lser_BT = jax.nn.logsumexp(lser_NBT, axis=0)

    # KL_t = sum_v p_v (z_v - zr_v) - lse_t + lser_t: the second pass needs the first's lse.
    @jax.checkpoint
    def chunk_cross(args):
        z_BTc, zr_BTc, real_c = logits(*args)
        p_BTc = jnp.exp(z_BTc - lse_BT[..., None])
        return jnp.sum(jnp.where(real_c, p_BTc * (z_BTc - zr_BTc), 0.0), axis=-1)

    kl_BT = jnp.sum(jax.lax.map(chunk_cross, (w_NDc, wr_NDc, starts_N)), axis=0) - lse_BT \
        + lser_BT
    w_BTD = jnp.take(w_DV.T, targets_BT.astype(jnp.int32), axis=0)
    logps_BT = jnp.einsum("BTD,BTD->BT", h_BTD, w_BTD,
                          preferred_element_type=jnp.float32) - lse_BT
    return logps_BT, kl_BT


def sami_logps_and_kl(config: ModelConfig, params, ref_params, batch, *,
                      vocab_chunk_size: int = 0):
    """`sami_logps` plus the per-query KL from the reference model, from one forward pass of
    the model (and one of the reference).

    Returns:
      (logps_BCC, mask_B, kl_B: per query, the mean over its response tokens, in all C x C
      rows, of the per-position KL over the vocabulary).
    """
    tokens = logprobs.batch_field(batch, "tokens", where="sami")
    if tokens.ndim != 4 or tokens.shape[1] != tokens.shape[2]:
        raise ValueError(f"sami: field 'tokens' must be [B, C, C, T], got {tokens.shape}")
    targets = logprobs.batch_field(batch, "targets", where="sami")
    mask = logprobs.batch_field(batch, "loss_mask", where="sami").astype(jnp.float32)
    lead, t = tokens.shape[:-1], tokens.shape[-1]
    flat = lambda x: None if x is None else jnp.asarray(x).reshape(-1, t)  # noqa: E731
    seg_BT, pos_BT = flat(batch.get("segment_ids")), flat(batch.get("positions"))
    mask_BT = flat(mask)
    if seg_BT is not None:
        mask_BT = jnp.where(seg_BT != 0, mask_BT, 0.0)
    kw = dict(positions_BT=pos_BT, segment_ids_BT=seg_BT)
    h_BTD, w_DV = transformer.forward_hidden(config, params, flat(tokens), **kw)
    ref_h_BTD, ref_w_DV = transformer.forward_hidden(config, ref_params, flat(tokens), **kw)
    chunk = logprobs.resolve_vocab_chunk(config.vocab_size, vocab_chunk_size)
    logps_BT, kl_BT = token_logps_and_kl(h_BTD, w_DV, ref_h_BTD, ref_w_DV, flat(targets),
                                         chunk_size=chunk)
    mask_BCCT = mask_BT.reshape(*lead, t)
    logps_BCC = logprobs.masked_sum(logps_BT.reshape(*lead, t), mask_BCCT, average=True)
    kl_sum_B = jnp.sum(jnp.where(mask_BCCT > 0, kl_BT.reshape(*lead, t), 0.0), axis=(1, 2, 3))
    count_B = jnp.sum(mask_BCCT, axis=(1, 2, 3))
    mask_B = (count_B > 0).astype(jnp.float32)
    return logps_BCC, mask_B, kl_sum_B / jnp.maximum(count_B, 1.0)


def sami_objective(params, batch, *, config: ModelConfig, ref_params=None,
                   kl_coef: float = 0.0, vocab_chunk_size: int = 0):
    """SAMI training loss on a [B, C, C, T] batch.

    Args:
      params: parameters (differentiated).
      batch: SAMI batch (see `sami_logps`).
      config: the model.
      ref_params: the frozen initial parameters (train_main's "params" reference), used by the
        KL regulariser only.
      kl_coef: weight of the per-position KL over the vocabulary from the initial model
        (module docstring; the paper's optional regulariser, 0 turns it off and needs no
        reference).
      vocab_chunk_size: see `sami_logps` (the KL walks the vocabulary in the same chunks).
    Returns:
      (loss, metrics of `sami_loss`, plus `kl` when kl_coef > 0).
    """
    if not kl_coef:
        logps_BCC, mask_B = sami_logps(config, params, batch, vocab_chunk_size=vocab_chunk_size)
        return sami_loss(logps_BCC, mask_B=mask_B)
    if ref_params is None:
        raise ValueError("sami: kl_coef > 0 needs the frozen initial params (reference)")
    logps_BCC, mask_B, kl_B = sami_logps_and_kl(config, params, ref_params, batch,
                                                vocab_chunk_size=vocab_chunk_size)
    loss, metrics = sami_loss(logps_BCC, mask_B=mask_B)
    kl = _wmean(kl_B, mask_B)
    loss = loss + kl_coef * kl
    return loss, {**metrics, "loss": loss, "kl": jax.lax.stop_gradient(kl)}
