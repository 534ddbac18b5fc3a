"""Shared pieces of the train tests: a next-token loss written here, a deterministic data
iterator with get_state/set_state, and a tiny model config."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.models import transformer
from align_jax.models.config import get_config

SEQ = 16


def tiny_config(**overrides):
    return get_config("tiny", **overrides)


def nll_loss(params, batch, *, config, rng=None, ref_params=None):
    """Mean next-token NLL over the loss mask (independent of align_jax.losses)."""
    del rng, ref_params
    logits_BTV = transformer.forward(config, params, batch["tokens"],
                                     positions_BT=batch["positions"],
                                     segment_ids_BT=batch["segment_ids"])
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BT = batch["loss_mask"]
    loss = jnp.sum(nll_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
    if "poison" in batch:
        # A batch flag that turns the loss into NaN: how the tests inject a divergence.
        loss = loss + jnp.where(jnp.max(batch["poison"]) > 0, jnp.nan, 0.0)
    return loss, {"tokens": jnp.sum(mask_BT)}


def per_row_nll_loss(params, batch, *, config, rng=None, ref_params=None):
    """Mean over rows of each row's mean NLL: rows weigh equally (for accumulation checks)."""
    del rng, ref_params
    logits_BTV = transformer.forward(config, params, batch["tokens"],
                                     positions_BT=batch["positions"],
                                     segment_ids_BT=batch["segment_ids"])
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BT = batch["loss_mask"]
    row_B = jnp.sum(nll_BT * mask_BT, axis=1) / jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0)
    return jnp.mean(row_B), {"row_nll_max": jnp.max(row_B)}


def make_batch(index, *, batch_size=8, seq=SEQ, vocab=512, poison=False, seed=0):
    """The index-th batch of a fixed random stream (two packed segments a row, some padding)."""
    rng = np.random.default_rng([seed, index])
    tokens = rng.integers(3, vocab, size=(batch_size, seq + 1), dtype=np.int32)
    cut = seq // 2 + int(rng.integers(-2, 3))
    seg = np.ones((batch_size, seq), np.int32)
    seg[:, cut:] = 2
    seg[:, seq - 2:] = 0  # padding tail
    pos = np.concatenate([np.arange(cut), np.arange(seq - cut)])[None].repeat(batch_size, 0)
    mask = (seg > 0).astype(np.float32)
    mask[:, cut - 1] = 0.0  # the last token of segment 1 does not predict segment 2
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
             "positions": pos.astype(np.int32), "segment_ids": seg}
    if poison:
        batch["poison"] = np.ones((batch_size,), np.float32)
    return batch


class CountingIterator:
    """Yields make_batch(0), make_batch(1), ...; its state is the next index."""

    def __init__(self, *, batch_size=8, poison_at=None, sleep=0.0, seed=0):
        self.index = 0
        self.batch_size = batch_size
        self.poison_at = poison_at
        self.sleep = sleep
        self.seed = seed

    def __iter__(self):
        return self

    def __next__(self):
        if self.sleep:
            time.sleep(self.sleep)
        i = self.index
        self.index += 1
        return make_batch(i, batch_size=self.batch_size, seed=self.seed,
                          poison=self.poison_at is not None and i == self.poison_at)

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def ref_aware_loss(params, batch, *, config, ref_params, rng=None):
    """nll_loss plus the distance of params from the frozen reference, as a metric."""
    loss, metrics = nll_loss(params, batch, config=config)
    diff = jax.tree.map(lambda a, b: a - b, params, ref_params)
    dist = jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in jax.tree.leaves(diff)))
    return loss, {**metrics, "ref_dist": dist}
