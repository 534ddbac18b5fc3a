"""The DPO family on paired preferences: sigmoid (DPO, conservative DPO with label smoothing),
robust (Chowdhury et al. 2024), hinge (SLiC), IPO, SimPO, reference-free DPO, plus the RPO
NLL term on the chosen responses.

Two batch layouts give the same loss for the same pairs:
  padded  keys [B, 2, T] (pair axis P: 0 chosen, 1 rejected), optional "ref_logps" [B, 2] and
          optional "pair_mask" [B];
  packed  keys [B, T] with several sequences per row, each its own segment, plus
          "chosen_segment"/"rejected_segment" [B, M], "pair_mask" [B, M], optional
          "ref_logps" [B, M, 2].
Either way, one forward pass scores chosen and rejected together.
"""

import jax
import jax.numpy as jnp

from align_jax.losses import logprobs
from align_jax.models.config import ModelConfig

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")


def _wmean(x: jax.Array, w: jax.Array | None) -> jax.Array:
    if w is None:
        return jnp.mean(x)
    w = w.astype(jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def _check_options(beta, loss_type, label_smoothing, gamma):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo: loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if isinstance(beta, (int, float)) and beta <= 0:
        raise ValueError(f"dpo: beta must be > 0, got {beta}")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ValueError(f"dpo: label_smoothing={label_smoothing} has no meaning for "
                         f"loss_type={loss_type!r} (use sigmoid, robust or simpo)")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo: robust needs label_smoothing in [0, 0.5), got {label_smoothing}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"dpo: label_smoothing must be in [0, 1], got {label_smoothing}")
    if gamma and loss_type != "simpo":
        raise ValueError(f"dpo: gamma={gamma} is the SimPO margin; loss_type={loss_type!r} "
                         "does not use it")


def dpo_loss(policy_chosen_B: jax.Array, policy_rejected_B: jax.Array, ref_chosen_B: jax.Array,
             ref_rejected_B: jax.Array, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, reference_free: bool = False, gamma: float = 0.0,
             weights_B: jax.Array | None = None):
    """Per-pair preference losses from sequence log-probs (inputs used as given).

    With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected) and eps the label
    smoothing:
      sigmoid  -(1-eps) log s(beta h) - eps log s(-beta h)
      robust   (-(1-eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)
      hinge    relu(1 - beta h)
      ipo      (h - 1/(2 beta))^2
      simpo    -(1-eps) log s(z) - eps log s(-z), z = beta (policy_chosen - policy_rejected) - gamma
               (pass length-averaged policy log-probs; the reference is ignored)
    reference_free sets both reference terms to zero.

    Args:
      policy_chosen_B, policy_rejected_B: policy log-probs of the chosen / rejected responses.
      ref_chosen_B, ref_rejected_B: reference log-probs (ignored by simpo and reference_free).
      beta: inverse temperature.
      loss_type: one of LOSS_TYPES.
      label_smoothing: assumed label-noise rate eps.
      reference_free: ignore the reference.
      gamma: SimPO target margin.
      weights_B: optional per-pair weights for the metric means (0 = padding pair).
    Returns:
      (losses_B float32, metrics: rewards_chosen, rewards_rejected, margin, accuracy as
      weighted means; rewards are beta * (policy - reference)).
    """
    _check_options(beta, loss_type, label_smoothing, gamma)
    shapes = {x.shape for x in (policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B)}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss: the four log-prob arrays must share one shape, got {shapes}")
    pc_B = policy_chosen_B.astype(jnp.float32)
    pr_B = policy_rejected_B.astype(jnp.float32)
    if reference_free or loss_type == "simpo":
        rc_B = rr_B = jnp.zeros_like(pc_B)
    else:
        rc_B = ref_chosen_B.astype(jnp.float32)
        rr_B = ref_rejected_B.astype(jnp.float32)
    chosen_ratio_B, rejected_ratio_B = pc_B - rc_B, pr_B - rr_B
    h_B = chosen_ratio_B - rejected_ratio_B
    eps = label_smoothing
    if loss_type == "sigmoid":
        z_B = beta * h_B
        losses_B = -(1 - eps) * jax.nn.log_sigmoid(z_B) - eps * jax.nn.log_sigmoid(-z_B)
    elif loss_type == "robust":
        z_B = beta * h_B
        losses_B = (-(1 - eps) * jax.nn.log_sigmoid(z_B)
                    + eps * jax.nn.log_sigmoid(-z_B)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses_B = jax.nn.relu(1.0 - beta * h_B)
    elif loss_type == "ipo":
        losses_B = (h_B - 1.0 / (2.0 * beta)) ** 2
    else:  # simpo
        z_B = beta * (pc_B - pr_B) - gamma
        losses_B = -(1 - eps) * jax.nn.log_sigmoid(z_B) - eps * jax.nn.log_sigmoid(-z_B)
    rewards_chosen_B = jax.lax.stop_gradient(beta * chosen_ratio_B)
    rewards_rejected_B = jax.lax.stop_gradient(beta * rejected_ratio_B)
    metrics = {
        "rewards_chosen": _wmean(rewards_chosen_B, weights_B),
        "rewards_rejected": _wmean(rewards_rejected_B, weights_B),
        "margin": _wmean(rewards_chosen_B - rewards_rejected_B, weights_B),
        "accuracy": _wmean((rewards_chosen_B > rewards_rejected_B).astype(jnp.float32),
                           weights_B),
    }
    return losses_B, metrics


def _pair_sums(config: ModelConfig, params, batch, *, vocab_chunk_size: int, where: str):
    """(logp sums [N, 2], scored-token counts [N, 2], pair weights [N]); N = B or B*M."""
    tokens = logprobs.batch_field(batch, "tokens", where=where)
    if "chosen_segment" in batch:
        if tokens.ndim != 2:
            raise ValueError(f"{where}: packed preference batch needs 'tokens' [B, T], got "
                             f"{tokens.shape}")
        seg_BT = logprobs.batch_field(batch, "segment_ids", where=where)
        chosen_BM = logprobs.batch_field(batch, "chosen_segment", where=where)
        rejected_BM = logprobs.batch_field(batch, "rejected_segment", where=where)
        pair_mask_BM = logprobs.batch_field(batch, "pair_mask", where=where).astype(jnp.float32)
        if not chosen_BM.shape == rejected_BM.shape == pair_mask_BM.shape:
            raise ValueError(f"{where}: 'chosen_segment' {chosen_BM.shape}, 'rejected_segment' "
                             f"{rejected_BM.shape} and 'pair_mask' {pair_mask_BM.shape} must "
                             "all be [B, M]")
        logps_BT, mask_BT = logprobs.forward_token_logps(
            config, params, batch, vocab_chunk_size=vocab_chunk_size, where=where)
        seg_sums = []
        for which_BM in (chosen_BM, rejected_BM):
            # Selecting with `where` rather than a one-hot matmul keeps the sums exact float32
            # on accelerators whose default matmul precision is bfloat16.
            hit_BTM = (seg_BT[:, :, None] == which_BM[:, None, :]) & (which_BM[:, None, :] != 0)
            seg_sums.append((jnp.sum(jnp.where(hit_BTM, logps_BT[:, :, None], 0.0), axis=1),
                             jnp.sum(jnp.where(hit_BTM, mask_BT[:, :, None], 0.0), axis=1)))
        (sum_c, cnt_c), (sum_r, cnt_r) = seg_sums
        sums_NP = jnp.stack([sum_c, sum_r], axis=-1).reshape(-1, 2)
        counts_NP = jnp.stack([cnt_c, cnt_r], axis=-1).reshape(-1, 2)
        weights_N = pair_mask_BM.reshape(-1)
    else:
        if tokens.ndim != 3 or tokens.shape[1] != 2:
            raise ValueError(f"{where}: padded preference batch needs 'tokens' [B, 2, T] "
                             f"(pair axis: chosen, rejected), got {tokens.shape}; a packed "
                             "batch needs 'chosen_segment'")
        logps_BPT, mask_BPT = logprobs.forward_token_logps(
            config, params, batch, vocab_chunk_size=vocab_chunk_size, where=where)
        sums_NP, counts_NP = jnp.sum(logps_BPT, axis=-1), jnp.sum(mask_BPT, axis=-1)
        weights_N = jnp.ones(sums_NP.shape[:1], jnp.float32)
        if "pair_mask" in batch:
            pair_mask_B = jnp.asarray(batch["pair_mask"], jnp.float32)
            if pair_mask_B.shape != weights_N.shape:
                raise ValueError(f"{where}: padded batch field 'pair_mask' has shape "
                                 f"{pair_mask_B.shape}, expected {weights_N.shape}")
            weights_N = pair_mask_B
    # A pair with no scored token at all is batch padding, whichever layout carried it.
    weights_N = weights_N * (jnp.sum(counts_NP, axis=-1) > 0)
    return sums_NP, counts_NP, weights_N


def precompute_ref_logps(config: ModelConfig, params, batch, *, vocab_chunk_size: int = 0):
    """Reference log-probs (sums over scored tokens) for the "precomputed reference" mode.

    Jit it with `jax.jit(functools.partial(precompute_ref_logps, config))`.

    Args:
      config: the reference model.
      params: the reference parameters.
      batch: a padded or packed preference batch.
      vocab_chunk_size: see `dpo_objective`.
    Returns:
      float32 [B, 2] (padded) or [B, M, 2] (packed): store as batch["ref_logps"].
    """
    sums_NP, _, _ = _pair_sums(config, params, batch, vocab_chunk_size=vocab_chunk_size,
                               where="precompute_ref_logps")
    if "chosen_segment" in batch:
        return sums_NP.reshape(*jnp.shape(batch["chosen_segment"]), 2)
    return sums_NP


def dpo_objective(params, batch, *, config: ModelConfig, beta: float = 0.1,
                  loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  reference_free: bool = False, gamma: float = 0.0, ref_params=None,
                  rpo_alpha: float = 0.0, average_logps: bool | None = None,
                  vocab_chunk_size: int = 0):
    """DPO-family training loss on a padded or packed preference batch.

    Sequence log-probs are sums over response tokens, or means with `average_logps` (the
    default for simpo; some IPO implementations also average). The reference
    comes from batch["ref_logps"] when present (precomputed; it wins over ref_params), else
    from a forward pass of `ref_params` under stop_gradient. simpo and reference_free need none.

    Args:
      params: policy parameters (differentiated).
      batch: a padded or packed preference batch (module docstring).
      config: the model.
      beta, loss_type, label_smoothing, reference_free, gamma: see `dpo_loss`.
      ref_params: frozen reference parameters.
      rpo_alpha: weight of the NLL of the chosen responses (mean over their tokens), as in RPO.
      average_logps: length-average policy and reference log-probs; None: only for simpo.
        Precomputed `ref_logps` are always sums (as `precompute_ref_logps` writes them).
      vocab_chunk_size: see `logprobs.forward_token_logps` (0: automatic, <0: full logits).
    Returns:
      (loss, metrics: loss, dpo_loss, rewards_chosen, rewards_rejected, margin, accuracy,
      num_pairs, and rpo_nll when rpo_alpha > 0).
    """
    _check_options(beta, loss_type, label_smoothing, gamma)
    where = "dpo_objective"
    # Decide where the reference comes from before any forward pass, so bad input fails fast.
    needs_ref = not (reference_free or loss_type == "simpo")
    ref_NP = None
    if needs_ref and "ref_logps" in batch:
        ref = jnp.asarray(batch["ref_logps"], jnp.float32)
        if "chosen_segment" in batch:
            expected = (*jnp.shape(batch["chosen_segment"]), 2)
        else:
            expected = (jnp.shape(logprobs.batch_field(batch, "tokens", where=where))[0], 2)
        if ref.shape != expected:
            raise ValueError(f"{where}: field 'ref_logps' has shape {ref.shape}, expected "
                             f"{expected}")
        ref_NP = ref.reshape(-1, 2)
    elif needs_ref and ref_params is None:
        raise ValueError(f"{where}: loss_type={loss_type!r} needs a reference: pass ref_params "
                         "or put precomputed 'ref_logps' in the batch (or set reference_free)")
    sums_NP, counts_NP, weights_N = _pair_sums(config, params, batch,
                                               vocab_chunk_size=vocab_chunk_size, where=where)
    if average_logps is None:
        average_logps = loss_type == "simpo"
    scale_NP = 1.0 / jnp.maximum(counts_NP, 1.0) if average_logps else 1.0
    policy_NP = sums_NP * scale_NP
    if not needs_ref:
        ref_NP = jnp.zeros_like(policy_NP)
    elif ref_NP is None:
        ref_NP, _, _ = _pair_sums(config, jax.lax.stop_gradient(ref_params), batch,
                                  vocab_chunk_size=vocab_chunk_size, where=where)
        ref_NP = jax.lax.stop_gradient(ref_NP)
    # The reference scores the same tokens, so the policy's counts average it too.
    ref_NP = ref_NP * scale_NP
    losses_N, metrics = dpo_loss(policy_NP[:, 0], policy_NP[:, 1], ref_NP[:, 0], ref_NP[:, 1],
                                 beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                 reference_free=reference_free, gamma=gamma, weights_B=weights_N)
    pref_loss = _wmean(losses_N, weights_N)
    loss = pref_loss
    metrics = {**metrics, "dpo_loss": pref_loss, "num_pairs": jnp.sum(weights_N)}
    if rpo_alpha:
        chosen_tokens = jnp.sum(counts_NP[:, 0] * weights_N)
        nll = -jnp.sum(sums_NP[:, 0] * weights_N) / jnp.maximum(chosen_tokens, 1.0)
        loss = loss + rpo_alpha * nll
        metrics["rpo_nll"] = nll
    metrics["loss"] = loss
    return loss, metrics
