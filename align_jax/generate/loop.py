"""The generation loop: one jitted prefill, then one jitted `lax.while_loop` decode.

    prompts --(prompt_batches: sort, bucket, left-pad; prefix: a shared prefix)--> PromptBatch
      --jit_prefill (the shared prefix once, then the rest)--> SamplingState (cache filled,
                    first token drawn)
      --jit_decode (state donated; runs until every row is done, the budget is spent or
                    `end_step` is reached)--> SamplingState
      --host (results): stop strings on the new text, once per chunk--> GenerationOutput /
                    Completion

Rows finish independently: a row is done when it draws a stop token (config EOS, tokenizer EOS
ids, `stop_token_ids`) or when the host finds a stop string in its text. Done rows keep running
through the batched forward pass (their outputs are ignored) until every row is done.

Output conventions: `tokens` are the new tokens only and include the token that ended the row
(a stop token, or the token completing a stop string); `texts` exclude it (they end just before
the stop token or stop string). `logprobs[i][j]` is log p(tokens[i][j]) under the model's raw
distribution (log_softmax of the unmodified logits: temperature 1, no penalty, no filtering,
and no constraint mask: a constrained row's log-probs are those of the unmasked model).

Constrained rows (`constraint=`, see `align_jax.generate.constraints`): each step masks the
logits to the tokens the row's automaton allows (stop tokens only where it accepts) and moves
its state on the device. Their texts are the bytes the automaton read, as UTF-8 (which can
differ from tokenizer.decode by a leading space); a row that ends before its automaton
accepts (the budget ran out) is flagged incomplete.
"""

import collections
from collections.abc import Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from align_jax import axes, sharding
from align_jax.generate import batch_inputs, prompt_batches, results, sampling, shape_cache, stop
from align_jax.generate import constraints as constraints_lib
from align_jax.generate import continuations as continuations_lib
from align_jax.generate import prefix as prefix_lib
from align_jax.generate.constraints import device as constraint_device
from align_jax.generate.results import Completion, GenerationOutput
from align_jax.models import transformer
from align_jax.models.config import ModelConfig

# Number of times each jitted function was traced (one trace = one compilation); tests and
# benchmarks read it through `trace_counts()`.
_TRACES: collections.Counter = collections.Counter()

DEFAULT_STOP_CHUNK = 32


def trace_counts() -> dict[str, int]:
    """How many times prefill and decode have been traced (compiled) in this process
    ("prefix": prefills traced with a shared prefix, see `align_jax.generate.prefix`)."""
    return dict(_TRACES)


@flax.struct.dataclass
class SamplingState:
    """The carry of the decode loop (B rows, M = max_new_tokens, S cache slots, V vocab).

    tokens_BM:    int32, generated tokens; 0 after a row is done.
    logprobs_BM:  float32, raw-model log-prob of each generated token.
    cache:        the KV cache of `transformer.init_cache` (k, v [L,B,S,K,H], segment_ids
                  [B,S], index: the next slot, shared by all rows).
    step:         int32 scalar, tokens drawn so far (same for every row).
    next_pos_B:   int32, RoPE position of the token fed next (prompt length + step - 1).
    lengths_B:    int32, tokens a row produced, including the one that stopped it.
    done_B:       bool, the row stopped (or is a filler row).
    stopped_B:    bool, the row stopped on a stop token (vs. ran out of budget).
    seen_BV:      bool presence mask (prompt + generated) for the repetition penalty, or None.
    continuation_logps_BK: float32, log p(continuation k | prompt) of up to K given
                  continuations per row, scored from the prefill's cache (see
                  `score_continuations`), or None when none were given.
    constraint_B: int32, each row's automaton state in the call's constraint tables (0: an
                  unconstrained row), or None when no row is constrained.
    """

    tokens_BM: jax.Array
    logprobs_BM: jax.Array
    cache: dict[str, jax.Array]
    step: jax.Array
    next_pos_B: jax.Array
    lengths_B: jax.Array
    done_B: jax.Array
    stopped_B: jax.Array
    seen_BV: jax.Array | None
    continuation_logps_BK: jax.Array | None = None
    constraint_B: jax.Array | None = None


def _constrain_cache(cache):
    logical = transformer.cache_axes()
    return {k: sharding.constrain(v, logical[k]) for k, v in cache.items()}


def _record(state: SamplingState, tokens_B, logprobs_B, stop_ids_E, tables=None,
            dead_B=None) -> SamplingState:
    """Writes the tokens drawn at `state.step` for live rows and updates done flags (and,
    with constraint tables, each row's automaton state; `dead_B` rows had no allowed token:
    they end here without a token)."""
    live_B = ~state.done_B if dead_B is None else ~state.done_B & ~dead_B
    tokens_B = jnp.where(live_B, tokens_B, 0)
    logprobs_B = jnp.where(live_B, logprobs_B, 0.0)
    is_stop_B = live_B & jnp.any(tokens_B[:, None] == stop_ids_E[None, :], axis=1)
    seen_BV = state.seen_BV
    if seen_BV is not None:
        seen_BV = jnp.where(live_B[:, None], sampling.mark_seen(seen_BV, tokens_B), seen_BV)
    if tables is not None:
        # A stop token ends the row where it is (its state stays the accepting one).
        state = state.replace(constraint_B=constraint_device.advance(
            tables, state.constraint_B, tokens_B, keep_B=~live_B | is_stop_B))
        is_stop_B = is_stop_B | dead_B
    return state.replace(
        tokens_BM=jax.lax.dynamic_update_slice_in_dim(
            state.tokens_BM, tokens_B[:, None], state.step, axis=1),
        logprobs_BM=jax.lax.dynamic_update_slice_in_dim(
            state.logprobs_BM, logprobs_B[:, None], state.step, axis=1),
        step=state.step + 1,
        lengths_B=state.lengths_B + live_B.astype(jnp.int32),
        done_B=state.done_B | is_stop_B,
        stopped_B=state.stopped_B | (is_stop_B if dead_B is None else is_stop_B & ~dead_B),
        seen_BV=seen_BV)


def _constrained_sample(logits_BV, state: SamplingState, sampler, flags, stop_ids_E, tables,
                        vocab_size):
    """sampling.sample, with the constraint mask when the call has constrained rows."""
    allowed_BV = dead_B = None
    if flags.constrained:
        allowed_BV = constraint_device.allowed(tables, state.constraint_B, stop_ids_E,
                                               vocab_size)
        allowed_BV = sharding.constrain(allowed_BV, (axes.BATCH, axes.VOCAB))
        dead_B = ~jnp.any(allowed_BV, axis=1)
    tokens_B, logprobs_B = sampling.sample(logits_BV, sampler, flags, step=state.step,
                                           seen_BV=state.seen_BV, allowed_BV=allowed_BV,
                                           generated_BM=state.tokens_BM)
    return _record(state, tokens_B, logprobs_B, stop_ids_E,
                   tables if flags.constrained else None, dead_B)


def _prefill(params, tokens_BT, positions_BT, segment_ids_BT, active_B, sampler, stop_ids_E,
             cont_BKA=None, cont_mask_BKA=None, tables=None, constraint_B=None, *,
             prefix_1T=None, config: ModelConfig,
             flags: sampling.SamplingFlags, max_new_tokens: int, cache_len: int, mesh,
             rules) -> SamplingState:
    del mesh, rules  # Static only so that each mesh/preset gets its own compiled version.
    _TRACES["prefill"] += 1
    b, t = tokens_BT.shape
    decoder = transformer.Decoder(config)
    if prefix_1T is None:
        cache, p = transformer.init_cache(config, b, cache_len), 0
    else:
        _TRACES["prefix"] += 1
        cache = prefix_lib.prefill_cache(params, prefix_1T, positions_BT, segment_ids_BT,
                                         config=config, cache_len=cache_len)
        p = prefix_1T.shape[1]
    # Only the last slot's logits are needed: unembedding the hidden states ourselves avoids
    # materialising [B, T, V] logits for long prompts and large vocabularies.
    h_BTD, cache = decoder.apply({"params": params}, tokens_BT[:, p:], positions_BT[:, p:],
                                 segment_ids_BT[:, p:], _constrain_cache(cache),
                                 method=transformer.Decoder.hidden)
    w_DV = decoder.apply({"params": params},
                         method=transformer.Decoder.unembed_matrix).astype(config.dtype)
    logits_BV = jnp.einsum("BD,DV->BV", h_BTD[:, -1], w_DV, preferred_element_type=jnp.float32)
    logits_BV = sharding.constrain(logits_BV, (axes.BATCH, axes.VOCAB))
    seen_BV = None
    if flags.repetition_penalty:
        rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        seen_BV = jnp.zeros((b, config.vocab_size), bool).at[rows_BT, tokens_BT].max(
            segment_ids_BT > 0)
        seen_BV = sharding.constrain(seen_BV, (axes.BATCH, axes.VOCAB))
    state = SamplingState(
        tokens_BM=jnp.zeros((b, max_new_tokens), jnp.int32),
        logprobs_BM=jnp.zeros((b, max_new_tokens), jnp.float32),
        cache=_constrain_cache(cache), step=jnp.int32(0),
        next_pos_B=jnp.max(positions_BT, axis=1) + 1,
        lengths_B=jnp.zeros((b,), jnp.int32), done_B=~active_B,
        stopped_B=jnp.zeros((b,), bool), seen_BV=seen_BV,
        constraint_B=constraint_B if flags.constrained else None)
    if cont_BKA is not None:
        state = state.replace(continuation_logps_BK=continuations_lib.continuation_logps(
            decoder, params, config, h_BTD[:, -1], w_DV, cache, state.next_pos_B, cont_BKA,
            cont_mask_BKA, prompt_len=t))
    return _constrained_sample(logits_BV, state, sampler, flags, stop_ids_E, tables,
                               config.vocab_size)


def _decode(params, state: SamplingState, sampler, stop_ids_E, end_step, tables=None, *,
            config: ModelConfig, flags: sampling.SamplingFlags, mesh, rules) -> SamplingState:
    del mesh, rules  # Static only so that each mesh/preset gets its own compiled version.
    _TRACES["decode"] += 1
    max_new, cache_len = state.tokens_BM.shape[1], state.cache["k"].shape[2]
    end_step = jnp.minimum(end_step, max_new)

    def cond(s: SamplingState):
        return (s.step < end_step) & (s.cache["index"] < cache_len) & ~jnp.all(s.done_B)

    def body(s: SamplingState):
        last_B1 = jax.lax.dynamic_slice_in_dim(s.tokens_BM, s.step - 1, 1, axis=1)
        logits_B1V, cache = transformer.forward_with_cache(
            config, params, last_B1, cache=s.cache, positions_BT=s.next_pos_B[:, None],
            segment_ids_BT=jnp.ones_like(last_B1))
        s = s.replace(cache=_constrain_cache(cache), next_pos_B=s.next_pos_B + 1)
        return _constrained_sample(logits_B1V[:, 0], s, sampler, flags, stop_ids_E, tables,
                                   config.vocab_size)

    return jax.lax.while_loop(cond, body, state)


# jax.jit with a bounded number of kept programs (shape_cache.set_max_programs; the server
# bounds it, since every new prompt length or budget compiles programs of its own).
jit_prefill = shape_cache.ShapeCache(
    _prefill, static_argnames=("config", "flags", "max_new_tokens", "cache_len", "mesh", "rules"))
jit_decode = shape_cache.ShapeCache(
    _decode, static_argnames=("config", "flags", "mesh", "rules"), donate_argnames=("state",))


def _run_batch(config, params, batch: prompt_batches.PromptBatch, *, max_new_tokens, shape_budget,
               cache_len, sampler_kw, row_seeds, stop_ids, stop_strings, tokenizer, chunk, mesh,
               rules, partial=False, cancel=None, cont=None, constrained=None
               ) -> Iterator[Completion]:
    if cancel is not None and cancel():
        return
    args, kw, sampler, flags = batch_inputs.prepare(
        config, batch, sampler_kw=sampler_kw, row_seeds=row_seeds, stop_ids=stop_ids, cont=cont,
        mesh=mesh, rules=rules, constrained=constrained)
    stop_ids = args[5]
    tables = args[8] if constrained is not None else None
    decoders = [results.row_decoder(tokenizer, constrained.compiled[i] if constrained else None)
                for i in batch.indices]
    compiled = [constrained.compiled[i] if constrained else None for i in batch.indices]
    accepting_Q = constrained.accepting_Q if constrained else None
    with sharding.use_mesh(mesh, rules):
        state = jit_prefill(params, *args, **kw, config=config, flags=flags,
                            max_new_tokens=shape_budget, cache_len=cache_len, mesh=mesh,
                            rules=rules)
        pending = set(range(len(batch.indices)))
        step, scores_BK = 1, None
        while pending:
            if cancel is not None and cancel():
                return
            end = min(step + chunk, max_new_tokens)
            state = jit_decode(params, state, sampler, stop_ids, jnp.int32(end), tables,
                               config=config, flags=flags, mesh=mesh, rules=rules)
            # The one host sync per chunk.
            (step, done_B, stopped_B, lengths_B, tokens_BM, logprobs_BM, scores,
             cstate_B) = sharding.fetch(
                (state.step, state.done_B, state.stopped_B, state.lengths_B, state.tokens_BM,
                 state.logprobs_BM, state.continuation_logps_BK if scores_BK is None else None,
                 state.constraint_B))
            # Continuation scores are final after the prefill: fetched once.
            scores_BK = scores if scores_BK is None else scores_BK
            step = int(step)
            fetched = (step, done_B, stopped_B, lengths_B, tokens_BM, logprobs_BM, scores_BK,
                       cstate_B)
            done, newly_done = results.chunk_results(
                batch, pending, fetched, max_new_tokens=max_new_tokens, decoders=decoders,
                compiled=compiled, accepting_Q=accepting_Q, stop_strings=stop_strings, cont=cont,
                partial=partial)
            yield from done
            if newly_done and pending:
                done_B = np.array(done_B)
                done_B[newly_done] = True
                state = state.replace(done_B=sharding.put(done_B, state.done_B.sharding))


def generate_stream(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                    logit_bias=None, stop_token_ids: Sequence[int] = (),
                    stop_strings: Sequence[str] = (), tokenizer=None, seed: int = 0,
                    seeds: Sequence[int] | None = None, mesh=None, rules="fsdp",
                    batch_size: int | None = None, max_len: int | None = None,
                    chunk_size: int | None = None, ignore_eos: bool = False,
                    partial: bool = False,
                    shape_budget: int | None = None,
                    cancel: Callable[[], bool] | None = None,
                    continuations: Sequence[Sequence[Sequence[int]]] | None = None,
                    constraint=None, share_prefix: bool | None = None
                    ) -> Iterator[Completion]:
    """Like `generate`, but yields a `Completion` for each prompt as soon as it finishes.

    Completion is observed at chunk boundaries: the device runs `chunk_size` decode steps
    between host checks (default: 32 with stop strings or `partial`, otherwise the whole
    budget in one call). Completions come in finishing order; `Completion.index` is the
    prompt's index. With `partial`, every unfinished prompt is also reported at each chunk
    boundary (finish_reason None): what a token-streaming server sends. `cancel`, polled at
    each chunk boundary, stops the generation when it returns True (the unfinished prompts
    yield nothing): how a server stops work for clients that left. With `continuations`, each
    finished Completion carries `continuation_logps`. With `constraint`, each finished
    Completion carries `incomplete`. See `generate` for the other arguments.
    """
    max_len = int(max_len or config.max_position)
    prompts = prompt_batches.validate_prompts(prompts, max_new_tokens=max_new_tokens,
                                              max_len=max_len, vocab_size=config.vocab_size)
    stop_strings = stop.validate_stop_strings(stop_strings, tokenizer)
    _check_share_prefix(share_prefix)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
    sampler_kw = sampling.settings_arrays(
        len(prompts), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, logit_bias=logit_bias,
        vocab_size=config.vocab_size)
    batch_size = batch_inputs.rows_per_batch(len(prompts), batch_size, mesh, rules)
    if chunk_size is None:
        chunk_size = DEFAULT_STOP_CHUNK if stop_strings or partial else max_new_tokens
    shape_budget = max_new_tokens if shape_budget is None else int(shape_budget)
    if shape_budget < max_new_tokens:
        raise ValueError(f"shape_budget={shape_budget} is below max_new_tokens="
                         f"{max_new_tokens}")
    # A larger shape never pushes the longest prompt out of the cache.
    longest = max((len(p) for p in prompts), default=1)
    shape_budget = max(max_new_tokens, min(shape_budget, max_len - longest))
    cont = None if continuations is None else continuations_lib.Continuations.make(
        continuations, len(prompts), prompts, max_len=max_len, vocab_size=config.vocab_size)
    per_prompt = constraints_lib.per_prompt(constraint, len(prompts))
    constrained = None if per_prompt is None else batch_inputs.CallConstraints(
        per_prompt, tokenizer, config, mesh, rules)
    batches, params = _plan(config, params, prompts, batch_size=batch_size,
                            cap=max_len - shape_budget, mesh=mesh, rules=rules,
                            share_prefix=share_prefix,
                            order_key=cont.sort_key() if cont is not None else None)
    run = dict(max_new_tokens=max_new_tokens, shape_budget=shape_budget, sampler_kw=sampler_kw,
               stop_ids=batch_inputs.stop_set(config, tokenizer, stop_token_ids, ignore_eos),
               stop_strings=stop_strings, tokenizer=tokenizer, chunk=max(1, int(chunk_size)),
               mesh=mesh, rules=rules, partial=partial, cancel=cancel, cont=cont,
               constrained=constrained)
    # Validation above runs eagerly; the work below runs as the caller iterates.
    return _stream(config, params, batches, seed=seed, seeds=seeds, run=run)


def _check_share_prefix(share_prefix) -> None:
    if share_prefix is not None and not isinstance(share_prefix, (bool, np.bool_)):
        raise ValueError(f"share_prefix must be None, True or False, got {share_prefix!r}")


def _plan(config, params, prompts, *, batch_size, cap, mesh, rules, share_prefix,
          order_key=None):
    """(left-padded batches, each with its shared prefix where one applies; params placed
    on the mesh or the default device)."""
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    if share_prefix is not False:
        groups = prefix_lib.order_key(prompts)
        order_key = groups if order_key is None else list(zip(order_key, groups))
    batches = prompt_batches.plan_batches(prompts, batch_size=batch_size, cap=cap, pad_id=pad_id,
                                          order_key=order_key)
    batches = [prefix_lib.share(b, prompts, config=config, mode=share_prefix, cap=cap,
                                pad_id=pad_id) for b in batches]
    if batches:
        if mesh is None:
            params = jax.device_put(params)
        else:
            params = sharding.put(params, sharding.tree_shardings(
                transformer.abstract_params(config), mesh, rules))
    return batches, params


def _cache_len(t: int, shape_budget: int) -> int:
    # The last drawn token is never fed back, so generation needs T + budget - 1 slots.
    # (Scored continuations pad their own copy of the cache when they need more.)
    return t + max(shape_budget - 1, 0)


def score_continuations(config: ModelConfig, params, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[Sequence[int]]], *, mesh=None,
                        rules="fsdp", batch_size: int | None = None,
                        max_len: int | None = None,
                        share_prefix: bool | None = None) -> list[tuple[float, ...]]:
    """log p(continuation | prompt) under the model for given continuations of each prompt.

    Each prompt is run once (the prefill of `generate`, left-padded and bucketed the same way)
    and every continuation of it extends that prompt's KV cache, so a preference pair's
    chosen and rejected answers share one pass over their prompt. `generate(...,
    continuations=...)` scores continuations from its own prefill in the same way, at no
    extra prompt pass.

    Args:
      config, params: the model.
      prompts: token id lists (each at least one token).
      continuations: for each prompt, its continuations (token id lists, each non-empty);
        prompt + continuation must fit max_len.
      mesh, rules, batch_size, max_len, share_prefix: as in `generate` (prompts with a
        common prefix share its pass here too).
    Returns:
      for each prompt, the summed log-prob of each of its continuations (float32 math).
    """
    max_len = int(max_len or config.max_position)
    prompts = prompt_batches.validate_prompts(prompts, max_new_tokens=1, max_len=max_len,
                                              vocab_size=config.vocab_size)
    _check_share_prefix(share_prefix)
    cont = continuations_lib.Continuations.make(continuations, len(prompts), prompts,
                                                max_len=max_len, vocab_size=config.vocab_size)
    batch_size = batch_inputs.rows_per_batch(len(prompts), batch_size, mesh, rules)
    batches, params = _plan(config, params, prompts, batch_size=batch_size,
                            cap=max_len - 1, mesh=mesh, rules=rules, share_prefix=share_prefix,
                            order_key=cont.sort_key())
    sampler_kw = sampling.settings_arrays(len(prompts), temperature=0.0, top_k=0, top_p=1.0,
                                          min_p=0.0, repetition_penalty=1.0)
    stop_ids = batch_inputs.stop_set(config, None, (), True)
    out: list[tuple[float, ...] | None] = [None] * len(prompts)
    pending = []
    with sharding.use_mesh(mesh, rules):
        for batch in batches:
            args, kw, _, flags = batch_inputs.prepare(
                config, batch, sampler_kw=sampler_kw,
                row_seeds=([0] * len(batch.indices), list(batch.indices)), stop_ids=stop_ids,
                cont=cont, mesh=mesh, rules=rules)
            state = jit_prefill(params, *args, **kw, config=config, flags=flags, max_new_tokens=1,
                                cache_len=_cache_len(batch.tokens_BT.shape[1], 1),
                                mesh=mesh, rules=rules)
            pending.append((batch, state.continuation_logps_BK))
    # One host sync at the end: the batches were all dispatched first.
    for batch, scores_BK in pending:
        scores_BK = np.asarray(sharding.fetch(scores_BK))
        for row in range(len(batch.indices)):
            out[batch.indices[row]] = continuations_lib.row_scores(cont, scores_BK, batch, row)
    return out


def _stream(config, params, batches, *, seed, seeds, run) -> Iterator[Completion]:
    for batch in batches:
        # Per-row keys: an explicit seed per prompt, or the shared seed salted with the
        # prompt's index; either way independent of how prompts were batched.
        if seeds is not None:
            row_seeds = ([int(seeds[i]) for i in batch.indices], [0] * len(batch.indices))
        else:
            row_seeds = ([int(seed)] * len(batch.indices), list(batch.indices))
        cache_len = _cache_len(batch.tokens_BT.shape[1], run["shape_budget"])
        yield from _run_batch(config, params, batch, cache_len=cache_len,
                              row_seeds=row_seeds, **run)


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
             logit_bias=None, stop_token_ids: Sequence[int] = (),
             stop_strings: Sequence[str] = (), tokenizer=None, seed: int = 0,
             seeds: Sequence[int] | None = None, mesh=None, rules="fsdp",
             batch_size: int | None = None, max_len: int | None = None,
             chunk_size: int | None = None, ignore_eos: bool = False,
             shape_budget: int | None = None,
             continuations: Sequence[Sequence[Sequence[int]]] | None = None,
             constraint=None, share_prefix: bool | None = None) -> GenerationOutput:
    """Generates continuations of token-id prompts with a KV cache.

    Args:
      config, params: the model.
      prompts: token id lists of any lengths (each at least one token).
      max_new_tokens: the budget per prompt.
      temperature: 0 = greedy; top_k (0 = off), top_p (1 = off), min_p (0 = off),
        repetition_penalty (1 = off, HF semantics): scalars or one value per prompt.
      presence_penalty, frequency_penalty: OpenAI's (0 = off), over the generated tokens:
        scalars or one value per prompt.  logit_bias: None, or logits added before sampling,
        [vocab_size] or [prompts, vocab_size].
      stop_token_ids: extra ids that end a row (config and tokenizer EOS ids always do,
        unless ignore_eos).
      stop_strings: strings that end a row, found in the decoded text (needs tokenizer).
      tokenizer: decodes texts (`texts` is filled when given).
      seed: shared seed, salted per prompt index; seeds: one seed per prompt instead.
      mesh, rules: place params, cache and batch on a mesh under a sharding preset.
      batch_size: rows per compiled batch (default: prompts rounded up to a power of two,
        at most 32; rounded up to a multiple of the mesh's batch shards).
      max_len: cache capacity (default config.max_position); prompt + budget must fit.
      chunk_size: decode steps between host checks (see `generate_stream`).
      ignore_eos: do not stop on EOS ids (stop_token_ids still apply).
      shape_budget: the token budget compiled into the loop's shapes (>= max_new_tokens;
        default max_new_tokens). Calls with different budgets but one shape_budget share
        their compilations; rows still stop after max_new_tokens.
      continuations: optional, for each prompt a list of token-id continuations to score
        (teacher-forced) from the prefill's own cache: `continuation_logps[i][j]` is
        log p(continuations[i][j] | prompts[i]), as `score_continuations` gives, while the
        generated text is unchanged. An evaluation that both answers and scores held-out
        questions runs each prompt once.
      constraint: None, one `align_jax.generate.constraints.Constraint` for every prompt, or
        a list with one Constraint-or-None per prompt (needs `tokenizer`). A constrained
        row's tokens always spell a prefix of a match, and it may stop only where a match is
        complete; `incomplete[i]` is True when its budget ran out first. The automata are
        compiled once per (tokenizer, constraint) and applied inside the jitted loop.
      share_prefix: whether a batch whose prompts start with the same tokens runs them once
        in its prefill (`align_jax.generate.prefix`): None (default) where that saves at
        least a quarter of the prefill's tokens, True wherever the prompts share a token,
        False never. Outputs equal those of the unshared prefill (up to float32 rounding);
        `shared_prefix_tokens[i]` says how many of prompt i's tokens were shared.
    Returns:
      GenerationOutput in prompt order; see the module docstring for what tokens, texts and
      logprobs contain.
    """
    results: dict[int, Completion] = {}
    for c in generate_stream(
            config, params, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
            stop_token_ids=stop_token_ids, stop_strings=stop_strings, tokenizer=tokenizer,
            seed=seed, seeds=seeds, mesh=mesh, rules=rules, batch_size=batch_size,
            max_len=max_len, chunk_size=chunk_size, ignore_eos=ignore_eos,
            shape_budget=shape_budget, continuations=continuations, constraint=constraint,
            share_prefix=share_prefix):
        results[c.index] = c
    order = [results[i] for i in range(len(results))]
    return GenerationOutput(
        tokens=[c.tokens for c in order], logprobs=[c.logprobs for c in order],
        finish_reasons=[c.finish_reason for c in order],
        texts=[c.text for c in order] if tokenizer is not None else None,
        continuation_logps=([c.continuation_logps for c in order]
                            if continuations is not None else None),
        incomplete=[c.incomplete for c in order] if constraint is not None else None,
        shared_prefix_tokens=[c.shared_prefix_tokens for c in order])
