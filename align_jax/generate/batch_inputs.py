"""A batch's inputs on the devices: the stop set, the call's constraint tables, each row's
sampler and automaton state, and the prompt arrays, placed on the mesh (batch axis sharded)
or on the default device.
"""

import dataclasses

import jax
import numpy as np

from align_jax import axes, sharding
from align_jax.generate import constraints as constraints_lib
from align_jax.generate import prompt_batches, sampling
from align_jax.generate.constraints import device as constraint_device
from align_jax.models.config import ModelConfig


def stop_set(config: ModelConfig, tokenizer, stop_token_ids, ignore_eos: bool) -> np.ndarray:
    """The ids that end a row: `stop_token_ids`, and unless ignore_eos the config's and the
    tokenizer's EOS ids; int32 [E], padded with -1."""
    ids = set(int(t) for t in stop_token_ids)
    if not ignore_eos:
        eos = config.eos_token_id
        ids.update((eos,) if isinstance(eos, int) else tuple(eos or ()))
        if tokenizer is not None:
            ids.update(int(t) for t in (getattr(tokenizer, "eos_ids", None) or ()))
    ids.discard(None)
    # Padded to a multiple of 8 with -1 (never drawn) so the set's size rarely recompiles.
    out = np.full((max(8, -(-len(ids) // 8) * 8),), -1, np.int32)
    out[:len(ids)] = sorted(ids)
    return out


def batch_shards(mesh, rules) -> int:
    """How many ways the batch axis is split on `mesh` under `rules` (1 without a mesh)."""
    if mesh is None:
        return 1
    entry = sharding.logical_to_spec((axes.BATCH,), rules)[0]
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    return int(np.prod([mesh.shape[n] for n in names])) if names else 1


def place(tree, mesh, rules):
    """Puts [B, ...] host arrays on the mesh, batch axis sharded (or on the default device)."""
    if mesh is None:
        return jax.device_put(tree)
    return jax.tree.map(lambda x: sharding.put(x, sharding.named_sharding(
        (axes.BATCH,) + (None,) * (np.ndim(x) - 1), mesh, rules, shape=np.shape(x))), tree)


class CallConstraints:
    """A call's constraints: the compiled automaton of each prompt, and their union as device
    tables (host copies kept for the per-chunk checks).

    Args: per_prompt: one Constraint or None per prompt; tokenizer: the model's (required);
    config: the model; mesh, rules: where the tables go (replicated).
    """

    def __init__(self, per_prompt, tokenizer, config: ModelConfig, mesh, rules):
        if tokenizer is None:
            raise ValueError("constraint needs the model's tokenizer (pass tokenizer=) to build "
                             "its token automaton")
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{config.vocab_size}: they do not belong together")
        self.compiled = [None if c is None else constraints_lib.compile_constraint(c, tokenizer)
                         for c in per_prompt]
        distinct = list({id(c): c for c in self.compiled if c is not None}.values())
        host, self.starts = constraint_device.build_tables(distinct,
                                                           vocab_size=config.vocab_size)
        self.accepting_Q = host.accepting_Q
        self.tables = (jax.device_put(host) if mesh is None
                       else sharding.put(host, sharding.replicated(mesh)))

    def start_states(self, batch: prompt_batches.PromptBatch) -> np.ndarray:
        out = np.zeros(len(batch.active_B), np.int32)
        for row, i in enumerate(batch.indices):
            c = self.compiled[i]
            out[row] = constraint_device.FREE if c is None else self.starts[c.constraint]
        return out


def prepare(config: ModelConfig, batch: prompt_batches.PromptBatch, *, sampler_kw,
            row_seeds, stop_ids, cont, mesh, rules, constrained: CallConstraints | None = None):
    """Device arrays for one batch's prefill.

    Args:
      config: the model; batch: the batch.
      sampler_kw: the call's per-prompt settings (`sampling.settings_arrays`).
      row_seeds: (seeds, salts) of the batch's real rows.
      stop_ids: the stop set (`stop_set`); cont: scored continuations or None;
      mesh, rules: the placement; constrained: the call's constraints or None.
    Returns:
      (positional args of `jit_prefill` after params, its keyword args (the shared prefix),
      the sampler, the sampling flags).
    """
    seeds, salts = row_seeds
    n_rows = len(batch.active_B)
    pad = n_rows - len(batch.indices)
    rows = list(batch.indices)
    settings = {k: np.concatenate([v[rows], np.full((pad, *v.shape[1:]), sampling.NEUTRAL[k],
                                                    v.dtype)])
                for k, v in sampler_kw.items()}
    sampler, flags = sampling.make_sampling(
        n_rows, seeds=list(seeds) + [0] * pad, salts=list(salts) + [0] * pad, **settings)
    host = [batch.tokens_BT, batch.positions_BT, batch.segment_ids_BT, batch.active_B, sampler]
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    scored = cont.arrays(batch, pad_id) if cont is not None else (None, None)
    if constrained is not None:
        flags = dataclasses.replace(flags, constrained=True)
        host.append(constrained.start_states(batch))
    arrays = place((*host, *(x for x in scored if x is not None)), mesh, rules)
    stop_ids = (jax.device_put(stop_ids) if mesh is None
                else sharding.put(stop_ids, sharding.replicated(mesh)))
    n = 5 + (constrained is not None)
    args = (*arrays[:5], stop_ids)
    if cont is not None or constrained is not None:
        args = (*args, *(tuple(arrays[n:]) if cont is not None else (None, None)))
    if constrained is not None:
        args = (*args, constrained.tables, arrays[5])
    # A [1, P] array: `place` replicates it (one row cannot be split over the batch axes).
    kw = {} if batch.prefix_1T is None else {"prefix_1T": place(batch.prefix_1T, mesh, rules)}
    return args, kw, arrays[4], flags


def rows_per_batch(n_prompts: int, batch_size: int | None, mesh, rules) -> int:
    """Rows of each compiled batch: `batch_size`, or by default the prompts rounded up to a
    power of two (at most DEFAULT_BATCH_SIZE); a multiple of the mesh's batch shards."""
    shards = batch_shards(mesh, rules)
    if batch_size is None:
        batch_size = min(prompt_batches.next_pow2(n_prompts), prompt_batches.DEFAULT_BATCH_SIZE)
    return -(-max(int(batch_size), 1) // shards) * shards
