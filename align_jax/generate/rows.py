"""Continuous batching on the device: a fixed set of decode rows that requests join and leave.

    RowsState (B rows, S cache slots per row, M = S token slots per row)
      --jit_insert (one prompt, right-padded to a bucket P: prefill it in a P-slot cache, copy
                    its keys/values into row r's slots [0, P), draw its first token)--> RowsState
      --jit_decode (state donated; up to `steps` decode steps of every live row, each at its
                    own cache slot and RoPE position)--> RowsState

Shapes never depend on the requests: B, S and the sampler flags are fixed, and prompts come
in a few bucket lengths, so everything compiles once (`warm` shapes in
`align_jax.generate.continuous`). Each row has its own cache index (`transformer.init_cache`'s
`index` as an int32 [B]): decode writes row b at slot index_B[b], masks its keys by its own
length and attention walks key blocks up to the longest row (`blockwise.attend_filled`).

A row's draw at its step t uses fold_in(key, t) with its own key, so its tokens do not depend
on when it joined or which rows share the batch. Free and finished rows stay in the batched
forward pass (their outputs are ignored; they write only at their own next slot, which a new
occupant's insert overwrites).
"""

import flax.struct
import jax
import jax.numpy as jnp

from align_jax.generate import loop, sampling
from align_jax.models import transformer
from align_jax.models.config import ModelConfig


@flax.struct.dataclass
class RowsState:
    """The engine's device state (B rows, S slots, M token slots, V vocab).

    cache:        k, v [L,B,S,K,H], segment_ids [B,S], index [B] (each row's next slot).
    sampler:      per-row `sampling.SamplingParams` (logit_bias_BV always present, zeros).
    tokens_BM:    int32, each row's generated tokens (0 past its step).
    logprobs_BM:  float32, raw-model log-prob of each generated token.
    step_B:       int32, tokens a row drew so far (its next draw folds in this step).
    budget_B:     int32, the most tokens a row may draw (its request's max_tokens).
    next_pos_B:   int32, RoPE position of the token a row feeds next.
    done_B:       bool, the row is finished or free.
    stopped_B:    bool, the row drew a stop token (vs. ran out of budget).
    seen_BV:      bool, tokens present in the row (prompt + generated): repetition penalty.
    """

    cache: dict[str, jax.Array]
    sampler: sampling.SamplingParams
    tokens_BM: jax.Array
    logprobs_BM: jax.Array
    step_B: jax.Array
    budget_B: jax.Array
    next_pos_B: jax.Array
    done_B: jax.Array
    stopped_B: jax.Array
    seen_BV: jax.Array


# The decode programs, cheapest first: a chunk runs the first one that serves every live
# row (ADJUST: penalties and logit bias, no sort; FULL: the top-k/top-p/min-p filters too, a
# sort of the vocabulary). A row's draw is the same under each (sampling.py draws by a
# Gumbel-max in id order and neutral settings change no logit), so the choice is free.
GREEDY = sampling.SamplingFlags()
SAMPLE = sampling.SamplingFlags(sample=True)
ADJUST = sampling.SamplingFlags(sample=True, repetition_penalty=True, penalties=True,
                                logit_bias=True)
FULL = sampling.SamplingFlags(sample=True, top_k=True, top_p=True, min_p=True,
                              repetition_penalty=True, penalties=True, logit_bias=True)
VARIANTS = (GREEDY, SAMPLE, ADJUST, FULL)


def init_state(config: ModelConfig, *, rows: int, cache_len: int) -> RowsState:
    """Every row free; the cache zeroed."""
    cache = transformer.init_cache(config, rows, cache_len)
    cache["index"] = jnp.zeros((rows,), jnp.int32)
    sampler, _ = sampling.make_sampling(rows)
    sampler = sampler.replace(logit_bias_BV=jnp.zeros((rows, config.vocab_size), jnp.float32))
    # Distinct buffers for every field: the state is donated whole.
    def zeros_B():
        return jnp.zeros((rows,), jnp.int32)

    return RowsState(cache=cache, sampler=sampler,
                     tokens_BM=jnp.zeros((rows, cache_len), jnp.int32),
                     logprobs_BM=jnp.zeros((rows, cache_len), jnp.float32), step_B=zeros_B(),
                     budget_B=zeros_B(), next_pos_B=zeros_B(), done_B=jnp.ones((rows,), bool),
                     stopped_B=jnp.zeros((rows,), bool),
                     seen_BV=jnp.zeros((rows, config.vocab_size), bool))


def _set_row(x, row, value):
    return jax.lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), row, axis=0)


def _insert(params, state: RowsState, tokens_1T, length, row, sampler_1, budget, stop_ids_E, *,
            config: ModelConfig) -> RowsState:
    """Prefills one right-padded prompt (its first `length` of P slots real) into row `row`
    with its settings `sampler_1` (arrays [1]) and budget, and draws its first token."""
    loop._TRACES["rows_insert"] += 1
    p = tokens_1T.shape[1]
    slot_1T = jnp.arange(p, dtype=jnp.int32)[None]
    seg_1T = (slot_1T < length).astype(jnp.int32)
    decoder = transformer.Decoder(config)
    small = transformer.init_cache(config, 1, p)
    h_1TD, small = decoder.apply({"params": params}, tokens_1T, jnp.minimum(slot_1T, length - 1),
                                 seg_1T, small, method=transformer.Decoder.hidden)
    w_DV = decoder.apply({"params": params},
                         method=transformer.Decoder.unembed_matrix).astype(config.dtype)
    h_1D = jax.lax.dynamic_index_in_dim(h_1TD, length - 1, axis=1, keepdims=False)
    logits_1V = jnp.einsum("BD,DV->BV", h_1D, w_DV, preferred_element_type=jnp.float32)
    seen_1V = jnp.zeros((1, config.vocab_size), bool).at[0, tokens_1T[0]].max(seg_1T[0] > 0)
    m = state.tokens_BM.shape[1]
    tok_1, lp_1 = sampling.sample(logits_1V, sampler_1, FULL, step=jnp.int32(0), seen_BV=seen_1V,
                                  generated_BM=jnp.zeros((1, m), jnp.int32))
    stop = jnp.any(tok_1[0] == stop_ids_E)
    cache = dict(state.cache)
    zero = jnp.zeros((), jnp.int32)
    for name in ("k", "v"):
        cache[name] = jax.lax.dynamic_update_slice(
            cache[name], small[name].astype(cache[name].dtype), (zero, row, zero, zero, zero))
    seg_S = jnp.zeros((cache["segment_ids"].shape[1],), jnp.int32)
    cache["segment_ids"] = _set_row(cache["segment_ids"], row,
                                    jax.lax.dynamic_update_slice_in_dim(seg_S, seg_1T[0], 0, 0))
    cache["index"] = _set_row(cache["index"], row, length)
    sampler = jax.tree.map(lambda a, x: _set_row(a, row, x[0]), state.sampler, sampler_1)
    first_M = jnp.zeros((m,), jnp.int32).at[0].set(tok_1[0])
    return state.replace(
        cache=cache, sampler=sampler,
        tokens_BM=_set_row(state.tokens_BM, row, first_M),
        logprobs_BM=_set_row(state.logprobs_BM, row,
                             jnp.zeros((m,), jnp.float32).at[0].set(lp_1[0])),
        step_B=_set_row(state.step_B, row, jnp.int32(1)),
        budget_B=_set_row(state.budget_B, row, budget),
        next_pos_B=_set_row(state.next_pos_B, row, length),
        done_B=_set_row(state.done_B, row, stop | (budget <= 1)),
        stopped_B=_set_row(state.stopped_B, row, stop),
        seen_BV=_set_row(state.seen_BV, row, sampling.mark_seen(seen_1V, tok_1)[0]))


def _decode(params, state: RowsState, stop_ids_E, steps, *, config: ModelConfig,
            flags: sampling.SamplingFlags) -> RowsState:
    """Up to `steps` decode steps of every live row (fewer when every row is done)."""
    loop._TRACES["rows_decode"] += 1
    b, m = state.tokens_BM.shape
    rows_B = jnp.arange(b)

    def cond(carry):
        i, s = carry
        return (i < steps) & ~jnp.all(s.done_B)

    def body(carry):
        i, s = carry
        last_B = s.tokens_BM[rows_B, jnp.maximum(s.step_B - 1, 0)]
        logits_B1V, cache = transformer.forward_with_cache(
            config, params, last_B[:, None], cache=s.cache, positions_BT=s.next_pos_B[:, None],
            segment_ids_BT=jnp.ones((b, 1), jnp.int32))
        tok_B, lp_B = sampling.sample(logits_B1V[:, 0], s.sampler, flags, step=s.step_B,
                                      seen_BV=s.seen_BV, generated_BM=s.tokens_BM)
        live_B = ~s.done_B
        live_i = live_B.astype(jnp.int32)
        # Finished rows write nowhere (an out-of-range slot is dropped) and keep their slot.
        at_B = jnp.where(live_B, s.step_B, m)
        cache["index"] = s.cache["index"] + live_i
        stop_B = live_B & jnp.any(tok_B[:, None] == stop_ids_E[None, :], axis=1)
        step_B = s.step_B + live_i
        seen_BV = jnp.where(live_B[:, None], sampling.mark_seen(s.seen_BV, tok_B), s.seen_BV)
        return i + 1, s.replace(
            cache=cache, tokens_BM=s.tokens_BM.at[rows_B, at_B].set(tok_B, mode="drop"),
            logprobs_BM=s.logprobs_BM.at[rows_B, at_B].set(lp_B, mode="drop"),
            step_B=step_B, next_pos_B=s.next_pos_B + live_i,
            done_B=s.done_B | stop_B | (step_B >= s.budget_B),
            stopped_B=s.stopped_B | stop_B, seen_BV=seen_BV)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def _release(state: RowsState, done_B) -> RowsState:
    """Marks rows finished from the host (a stop string, a client that left)."""
    return state.replace(done_B=state.done_B | done_B)


jit_insert = jax.jit(_insert, static_argnames=("config",), donate_argnames=("state",))
jit_decode = jax.jit(_decode, static_argnames=("config", "flags"), donate_argnames=("state",))
jit_release = jax.jit(_release, donate_argnames=("state",))


def variant(needs: list[sampling.SamplingFlags]) -> sampling.SamplingFlags:
    """The cheapest decode program that serves rows with these needs (`row_needs`)."""
    return VARIANTS[max((VARIANTS.index(f) for f in needs), default=0)]


def row_needs(settings: dict, logit_bias) -> sampling.SamplingFlags:
    """Which decode program one request's settings need (one of VARIANTS)."""
    if (settings.get("top_k", 0) > 0 or settings.get("top_p", 1.0) < 1.0
            or settings.get("min_p", 0.0) > 0):
        return FULL
    if (settings.get("repetition_penalty", 1.0) != 1 or bool(logit_bias)
            or settings.get("presence_penalty", 0.0) != 0
            or settings.get("frequency_penalty", 0.0) != 0):
        return ADJUST
    return SAMPLE if settings.get("temperature", 0.0) > 0 else GREEDY

