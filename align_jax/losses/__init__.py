"""Training objectives: each `*_objective` / `sft_loss` / `lm_loss` is
(params, batch, *, config, ...) -> (scalar loss, metrics dict of scalars); the pure functions
(`sequence_logps`, `dpo_loss`, `kto_loss`, `sami_loss`, `classification_loss`) work on arrays.
"""

from align_jax.losses.aligner import aligner_loss
from align_jax.losses.classification import classification_loss, classification_objective
from align_jax.losses.dpo import LOSS_TYPES as DPO_LOSS_TYPES
from align_jax.losses.dpo import dpo_loss, dpo_objective, precompute_ref_logps
from align_jax.losses.kto import kto_loss, kto_objective, precompute_kto_ref_logps
from align_jax.losses.logprobs import (
    batch_field,
    chunked_token_logps,
    forward_token_logps,
    masked_sum,
    sequence_logps,
    token_logps,
)
from align_jax.losses.sami import sami_logps, sami_loss, sami_objective
from align_jax.losses.sft import lm_loss, nll_loss, sft_loss

__all__ = [
    "aligner_loss",
    "DPO_LOSS_TYPES",
    "batch_field",
    "chunked_token_logps",
    "classification_loss",
    "classification_objective",
    "dpo_loss",
    "dpo_objective",
    "forward_token_logps",
    "kto_loss",
    "kto_objective",
    "lm_loss",
    "masked_sum",
    "nll_loss",
    "precompute_kto_ref_logps",
    "precompute_ref_logps",
    "sami_logps",
    "sami_loss",
    "sami_objective",
    "sequence_logps",
    "sft_loss",
    "token_logps",
]
