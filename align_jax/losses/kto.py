"""KTO on unpaired preferences (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization").

Each row is one (prompt, completion) with a label (1 desirable, 0 undesirable). The reference
point z0 is a batch estimate of KL(policy || reference) taken on mismatched prompt/completion
pairs (the "kl_*" fields), clamped at 0 and not differentiated:
  z0 = max(0, mean_b(policy_kl_logps - ref_kl_logps)),   r = policy_logps - ref_logps,
  desirable:   desirable_weight   * (1 - sigmoid(beta (r - z0)))
  undesirable: undesirable_weight * (1 - sigmoid(beta (z0 - r))).
"""

import jax
import jax.numpy as jnp

from align_jax.losses import logprobs
from align_jax.models.config import ModelConfig

_ROW_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def _wmean(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def kto_loss(policy_B: jax.Array, ref_B: jax.Array, policy_kl_B: jax.Array,
             ref_kl_B: jax.Array, labels_B: jax.Array, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             mask_B: jax.Array | None = None):
    """Per-example KTO losses from sequence log-probs (summed over completion tokens).

    Args:
      policy_B, ref_B: policy / reference log-probs of each row's completion.
      policy_kl_B, ref_kl_B: the same on the mismatched pairs (for the reference point z0).
      labels_B: 1 desirable, 0 undesirable.
      beta: inverse temperature.
      desirable_weight, undesirable_weight: class weights (lambda_D, lambda_U in the paper).
      mask_B: 1 for real rows, 0 for batch padding (excluded from z0 and the metrics).
    Returns:
      (losses_B float32, metrics: kl (z0), rewards_desirable, rewards_undesirable, margin,
      num_desirable, num_undesirable).
    """
    if isinstance(beta, (int, float)) and beta <= 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}")
    shapes = {x.shape for x in (policy_B, ref_B, policy_kl_B, ref_kl_B, labels_B)}
    if len(shapes) != 1:
        raise ValueError(f"kto_loss: all inputs must share one [B] shape, got {shapes}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    w_B = jnp.ones_like(f32(policy_B)) if mask_B is None else f32(mask_B)
    z0 = jax.lax.stop_gradient(jnp.maximum(_wmean(f32(policy_kl_B) - f32(ref_kl_B), w_B), 0.0))
    r_B = f32(policy_B) - f32(ref_B)
    desirable_B = f32(labels_B) > 0.5
    losses_B = jnp.where(
        desirable_B,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r_B - z0))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - r_B))))
    rewards_B = jax.lax.stop_gradient(beta * r_B)
    w_des_B, w_und_B = w_B * desirable_B, w_B * (~desirable_B)
    rewards_des, rewards_und = _wmean(rewards_B, w_des_B), _wmean(rewards_B, w_und_B)
    metrics = {"kl": z0, "rewards_desirable": rewards_des, "rewards_undesirable": rewards_und,
               "margin": rewards_des - rewards_und, "num_desirable": jnp.sum(w_des_B),
               "num_undesirable": jnp.sum(w_und_B)}
    return losses_B, metrics


def _with_kl_rows(batch, where: str):
    """The main and the mismatched rows stacked on the batch axis: [2B, T], one forward pass."""
    merged = {}
    for key in _ROW_KEYS:
        if key not in batch and "kl_" + key not in batch and key in ("positions", "segment_ids"):
            continue
        main = logprobs.batch_field(batch, key, where=where)
        kl = logprobs.batch_field(batch, "kl_" + key, where=where)
        if main.shape != kl.shape:
            raise ValueError(f"{where}: field 'kl_{key}' has shape {kl.shape}, expected "
                             f"{main.shape} like {key!r}")
        merged[key] = jnp.concatenate([main, kl.astype(main.dtype)], axis=0)
    return merged


def _kto_sums(config, params, batch, *, vocab_chunk_size: int, where: str):
    logps_XT, mask_XT = logprobs.forward_token_logps(
        config, params, _with_kl_rows(batch, where), vocab_chunk_size=vocab_chunk_size,
        where=where)
    b = logps_XT.shape[0] // 2
    sums_X, counts_X = jnp.sum(logps_XT, axis=-1), jnp.sum(mask_XT, axis=-1)
    return sums_X[:b], sums_X[b:], counts_X[:b]


def precompute_kto_ref_logps(config: ModelConfig, params, batch, *,
                             vocab_chunk_size: int = 0) -> dict[str, jax.Array]:
    """Reference log-probs for a KTO batch: {"ref_logps": [B], "ref_kl_logps": [B]} float32.

    Args:
      config: the reference model.
      params: the reference parameters.
      batch: a KTO batch.
      vocab_chunk_size: see `kto_objective`.
    Returns:
      the two fields to merge into the batch.
    """
    ref_B, ref_kl_B, _ = _kto_sums(config, params, batch, vocab_chunk_size=vocab_chunk_size,
                                   where="precompute_kto_ref_logps")
    return {"ref_logps": ref_B, "ref_kl_logps": ref_kl_B}


def kto_objective(params, batch, *, config: ModelConfig, beta: float = 0.1,
                  desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                  ref_params=None, vocab_chunk_size: int = 0):
    """KTO training loss: mean over real rows of the weighted per-example losses.

    The reference comes from batch["ref_logps"] and batch["ref_kl_logps"] when present, else from
    `ref_params` (forward under stop_gradient).

    Args:
      params: policy parameters (differentiated).
      batch: LM keys [B, T], "label" [B], the "kl_*" keys [B, T], optional reference fields.
      config: the model.
      beta, desirable_weight, undesirable_weight: see `kto_loss`.
      ref_params: frozen reference parameters.
      vocab_chunk_size: see `logprobs.forward_token_logps` (0: automatic, <0: full logits).
    Returns:
      (loss, metrics of `kto_loss` plus "loss").
    """
    where = "kto_objective"
    labels_B = logprobs.batch_field(batch, "label", where=where)
    precomputed = "ref_logps" in batch and "ref_kl_logps" in batch
    if not precomputed and ref_params is None:
        raise ValueError(f"{where}: needs a reference: pass ref_params or put both 'ref_logps' "
                         "and 'ref_kl_logps' in the batch")
    policy_B, policy_kl_B, counts_B = _kto_sums(config, params, batch,
                                                vocab_chunk_size=vocab_chunk_size, where=where)
    if labels_B.shape != policy_B.shape:
        raise ValueError(f"{where}: field 'label' has shape {labels_B.shape}, expected "
                         f"{policy_B.shape}")
    if precomputed:
        ref_B = jnp.asarray(batch["ref_logps"], jnp.float32)
        ref_kl_B = jnp.asarray(batch["ref_kl_logps"], jnp.float32)
    else:
        ref_B, ref_kl_B, _ = _kto_sums(config, jax.lax.stop_gradient(ref_params), batch,
                                       vocab_chunk_size=vocab_chunk_size, where=where)
        ref_B, ref_kl_B = jax.lax.stop_gradient(ref_B), jax.lax.stop_gradient(ref_kl_B)
    mask_B = (counts_B > 0).astype(jnp.float32)
    losses_B, metrics = kto_loss(policy_B, ref_B, policy_kl_B, ref_kl_B, labels_B, beta=beta,
                                 desirable_weight=desirable_weight,
                                 undesirable_weight=undesirable_weight, mask_B=mask_B)
    loss = _wmean(losses_B, mask_B)
    return loss, {**metrics, "loss": loss}
