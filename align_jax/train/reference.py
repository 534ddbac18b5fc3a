"""The cheap reference mode: reference log-probs computed once over the dataset.

The reference model then never sits in memory during training, and a resumed run reads the
values back from a cache file keyed by the examples and the reference params.
"""

import dataclasses
import hashlib
import logging
import os

import jax
import numpy as np

from align_jax.data import batching
from align_jax.data.formatting import Example
from align_jax.losses.scorer import bind, score_examples
from align_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


def _fingerprint(examples: list[Example], config: ModelConfig, params) -> str:
    h = hashlib.sha256(repr(config).encode())
    for ex in examples:
        h.update(np.asarray(ex.prompt, np.int32).tobytes())
        for c in ex.completions:
            h.update(b"|" + np.asarray(c, np.int32).tobytes())
    # A cheap digest of the params: their sums per leaf.
    sums = [float(np.asarray(jax.device_get(x), np.float64).sum()) for x in jax.tree.leaves(params)]
    h.update(np.asarray(sums).tobytes())
    return h.hexdigest()[:16]


def attach_reference_logps(examples: list[Example], *, precompute, config: ModelConfig, params,
                           seq_len: int, batch_size: int = 8, cache_dir: str | None = None,
                           vocab_chunk_size: int = 0, mesh=None,
                           rules: str = "dp") -> list[Example]:
    """Returns the examples with `ref_logps` = (chosen, rejected) summed log-probs under params.

    Args:
      examples: tokenised preference examples (completions = (chosen, rejected)).
      precompute: the objective's `precompute_reference(config, params, batch, *,
        vocab_chunk_size) -> [B, 2]` (DPO: `losses.precompute_ref_logps`).
      config, params: the reference model (for DPO after SFT: the SFT model).
      seq_len: the training sequence length (each sequence fits it after truncation).
      batch_size: rows per forward pass.
      cache_dir: when given, values are stored there and reused by a resumed run.
      vocab_chunk_size: see `align_jax.losses.dpo_objective`.
      mesh, rules: the device mesh the batches are split over (`losses.scorer`).
    Returns:
      New Example objects in the same order.
    """
    path = None
    if cache_dir is not None:
        key = _fingerprint(examples, config, params)
        path = os.path.join(cache_dir, f"ref_logps-{key}.npy")
        if os.path.exists(path):
            values = np.load(path)
            log.info("reference log-probs read from %s", path)
            return [_with(ex, v) for ex, v in zip(examples, values)]
    values = score_examples(
        bind(precompute, config, vocab_chunk_size=vocab_chunk_size), params,
        examples, build=batching.pad_pair_batch, seq_len=seq_len, batch_size=batch_size,
        mesh=mesh, rules=rules, progress="reference log-probs").astype(np.float32)
    if path is not None and jax.process_index() == 0:
        # Every process computed the same values; one writes them (same file, shared folder).
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npy"
        np.save(tmp, values)
        os.replace(tmp, path)
    return [_with(ex, v) for ex, v in zip(examples, values)]


def _with(example: Example, values) -> Example:
    return dataclasses.replace(example, ref_logps=(float(values[0]), float(values[1])))
