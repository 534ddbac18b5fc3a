"""Token sampling from a batch of logits [B, V]: all pure and jittable.

Each row carries its own settings (arrays [B]), so one compiled sampler serves a batch that
mixes greedy and sampled requests. Which filters exist at all is static (`SamplingFlags`), so
a greedy batch compiles to an argmax with no sort.

Processing order follows Hugging Face's `generate`: repetition penalty, then OpenAI's presence
and frequency penalties (over the tokens generated so far) and logit bias, then temperature,
top-k, top-p, min-p; greedy rows (temperature 0) take the argmax of the penalised logits.
The filters become one threshold per row (tokens tied with the last kept one stay, as in HF's
top-k), and the draw is a Gumbel-max over the vocabulary in id order, so a row's samples do
not depend on which other rows (and so which compiled-in filters) share its batch.
"""

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingFlags:
    """Static switches: which parts of the sampler are compiled in.

    top_k_max: when every row has top_k > 0, only the top `top_k_max` candidates are sorted
      (lax.top_k); 0 means rows may be unlimited, so the whole vocabulary is sorted when any
      filter needs a sort.
    constrained: some row follows a constraint automaton (the loop masks the logits); False
      compiles exactly the unconstrained sampler.
    """

    sample: bool = False
    top_k: bool = False
    top_k_max: int = 0
    top_p: bool = False
    min_p: bool = False
    repetition_penalty: bool = False
    penalties: bool = False
    logit_bias: bool = False
    constrained: bool = False


@flax.struct.dataclass
class SamplingParams:
    """Per-row sampling settings, each an array [B].

    temperature_B: 0 = greedy.  top_k_B: 0 = off.  top_p_B: 1 = off.  min_p_B: 0 = off.
    repetition_penalty_B: 1 = off.  key_B: a PRNG key per row; step t draws with fold_in(key, t),
    so a row's samples do not depend on which other rows share its batch.
    presence_penalty_B, frequency_penalty_B: 0 = off (OpenAI's: subtracted from the logit of
    each token generated so far, once / once per occurrence).  logit_bias_BV: added to the
    logits, or None when no row has one.
    """

    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    min_p_B: jax.Array
    repetition_penalty_B: jax.Array
    key_B: jax.Array
    presence_penalty_B: jax.Array
    frequency_penalty_B: jax.Array
    logit_bias_BV: jax.Array | None = None


# Settings of a row that samples nothing special: used for filler rows.
NEUTRAL = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
               presence_penalty=0.0, frequency_penalty=0.0, logit_bias=0.0)


def settings_arrays(n: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                    logit_bias=None, vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """Checks sampling settings and broadcasts each to a numpy array [n].

    Args:
      n: number of prompts (rows).
      temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
        frequency_penalty: a scalar or n values.
      logit_bias: None, or added logits: [vocab_size] or [n, vocab_size] (needs vocab_size).
    Returns:
      {name: array [n]} (logit_bias: [n, V], only when given); raises ValueError naming the
      setting and the first bad prompt.
    """
    dtypes = dict(temperature=np.float32, top_k=np.int32, top_p=np.float32, min_p=np.float32,
                  repetition_penalty=np.float32, presence_penalty=np.float32,
                  frequency_penalty=np.float32, logit_bias=np.float32)
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty)
    shapes = {}
    if logit_bias is not None:
        if vocab_size is None:
            raise ValueError("sampling setting logit_bias needs vocab_size")
        given["logit_bias"], shapes["logit_bias"] = logit_bias, (n, int(vocab_size))
    out = {}
    for name, x in given.items():
        try:
            a = np.broadcast_to(np.asarray(x, dtypes[name]), shapes.get(name, (n,))).copy()
        except ValueError as e:
            raise ValueError(f"sampling setting {name}: expected a scalar or {n} values "
                             f"(logit_bias: [vocab_size] or [{n}, vocab_size])") from e
        if not np.all(np.isfinite(a)):
            raise ValueError(f"sampling setting {name} must be finite, got {x!r}")
        out[name] = a
    bad = dict(temperature=out["temperature"] < 0, top_k=out["top_k"] < 0,
               top_p=(out["top_p"] <= 0) | (out["top_p"] > 1),
               min_p=(out["min_p"] < 0) | (out["min_p"] > 1),
               repetition_penalty=out["repetition_penalty"] <= 0)
    for name, b in bad.items():
        if b.any():
            i = int(np.argmax(b))
            raise ValueError(f"sampling setting {name}={out[name][i]} is out of range "
                             f"(prompt {i})")
    return out


def make_sampling(batch: int, *, seeds: Sequence[int] | None = None,
                  salts: Sequence[int] | None = None,
                  **settings) -> tuple[SamplingParams, SamplingFlags]:
    """Host-side constructor of (SamplingParams, SamplingFlags) for `batch` rows.

    Args:
      batch: number of rows.
      seeds: per-row seeds (default 0); salts: per-row integers folded into the seed's key
        (default 0), so rows sharing a seed still draw differently.
      **settings: temperature, top_k, top_p, min_p, repetition_penalty (see
        `settings_arrays`).
    Returns:
      (params with arrays [B], static flags).
    """
    if settings.get("logit_bias") is not None and "vocab_size" not in settings:
        settings["vocab_size"] = np.shape(settings["logit_bias"])[-1]
    a = settings_arrays(batch, **settings)
    temp, k = a["temperature"], a["top_k"]
    # Any Python int is a valid seed: reduced to uint32, as jax.random.key would.
    seeds_B = np.broadcast_to(np.asarray(0 if seeds is None else seeds, object) % 2**32,
                              (batch,)).astype(np.uint32)
    salts_B = np.broadcast_to(np.asarray(0 if salts is None else salts, object) % 2**32,
                              (batch,)).astype(np.uint32)
    key_B = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(
        jnp.asarray(seeds_B), jnp.asarray(salts_B))
    sampled = temp > 0
    bias = a.get("logit_bias")
    flags = SamplingFlags(
        penalties=bool((a["presence_penalty"] != 0).any() or (a["frequency_penalty"] != 0).any()),
        logit_bias=bias is not None and bool((bias != 0).any()),
        sample=bool(sampled.any()),
        top_k=bool((sampled & (k > 0)).any()),
        top_k_max=int(k[sampled].max()) if (sampled.any() and (k[sampled] > 0).all()) else 0,
        top_p=bool((sampled & (a["top_p"] < 1)).any()),
        min_p=bool((sampled & (a["min_p"] > 0)).any()),
        repetition_penalty=bool((a["repetition_penalty"] != 1).any()))
    params = SamplingParams(
        temperature_B=jnp.asarray(temp), top_k_B=jnp.asarray(k),
        top_p_B=jnp.asarray(a["top_p"]), min_p_B=jnp.asarray(a["min_p"]),
        repetition_penalty_B=jnp.asarray(a["repetition_penalty"]), key_B=key_B,
        presence_penalty_B=jnp.asarray(a["presence_penalty"]),
        frequency_penalty_B=jnp.asarray(a["frequency_penalty"]),
        logit_bias_BV=jnp.asarray(bias) if flags.logit_bias else None)
    return params, flags


def apply_repetition_penalty(logits_BV: jax.Array, seen_BV: jax.Array,
                             penalty_B: jax.Array) -> jax.Array:
    """Hugging Face semantics: for tokens already present (prompt or generated), positive
    logits are divided by the penalty and negative ones multiplied by it.

    Args:
      logits_BV: float logits.  seen_BV: bool, token present in the row.  penalty_B: > 0.
    Returns:
      penalised logits [B, V].
    """
    pen_B1 = penalty_B[:, None].astype(logits_BV.dtype)
    penalised_BV = jnp.where(logits_BV > 0, logits_BV / pen_B1, logits_BV * pen_B1)
    return jnp.where(seen_BV, penalised_BV, logits_BV)


def apply_openai_penalties(logits_BV: jax.Array, generated_BM: jax.Array, step: jax.Array,
                           presence_B: jax.Array, frequency_B: jax.Array) -> jax.Array:
    """OpenAI's semantics: logit[j] -= frequency * count[j] + presence * (count[j] > 0), where
    count[j] counts token j among the tokens generated so far (the prompt does not count).

    Args:
      logits_BV: float logits.  generated_BM: int32 generated tokens; the first `step` are
        real.  step: int32 scalar, or [B] (per row).  presence_B, frequency_B: per-row
        penalties.
    Returns:
      penalised logits [B, V].
    """
    b, m = generated_BM.shape
    step_B1 = jnp.reshape(step, (-1, 1))  # one step for all rows, or one per row
    real_BM = (jnp.arange(m, dtype=jnp.int32)[None, :] < step_B1).astype(jnp.float32)
    count_BV = jnp.zeros(logits_BV.shape, jnp.float32).at[
        jnp.arange(b)[:, None], generated_BM].add(real_BM)
    return logits_BV - (frequency_B[:, None] * count_BV
                        + presence_B[:, None] * (count_BV > 0).astype(jnp.float32))


def mark_seen(seen_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """Adds one token per row to the presence mask."""
    return seen_BV.at[jnp.arange(tokens_B.shape[0]), tokens_B].set(True)


def keep_threshold(sorted_BK: jax.Array, params: SamplingParams,
                   flags: SamplingFlags) -> jax.Array:
    """The smallest scaled logit that survives top-k, top-p and min-p, per row.

    Args:
      sorted_BK: temperature-scaled logits sorted descending along K (K = V, or top_k_max
        when every sampled row has a top-k).
    Returns:
      threshold_B: candidates with a scaled logit >= it are kept (the best always is). Each
      filter keeps a prefix of the ranking, so their intersection is a prefix too and one
      threshold describes it.
    """
    rank_K = jnp.arange(sorted_BK.shape[1], dtype=jnp.int32)
    keep_BK = jnp.ones(sorted_BK.shape, bool)
    if flags.top_k:
        k_B1 = params.top_k_B[:, None]
        keep_BK &= (k_B1 <= 0) | (rank_K[None] < k_B1)
    if flags.top_p:
        masked_BK = jnp.where(keep_BK, sorted_BK, _NEG_INF)
        probs_BK = jax.nn.softmax(masked_BK.astype(jnp.float32), axis=-1)
        # A candidate stays if the mass strictly above it is below top_p (HF's rule read
        # from the top of the ranking); rank 0 always stays.
        above_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
        # top_p = 1 keeps everything: float32 rounding of the cumsum must not drop the tail
        # (a row's draw would then depend on whether its batch compiled in top-p).
        top_p_B1 = params.top_p_B[:, None]
        keep_BK &= (above_BK < top_p_B1) | (rank_K[None] == 0) | (top_p_B1 >= 1.0)
    if flags.min_p:
        # p_i >= min_p * p_max  <=>  s_i - s_max >= log(min_p); independent of normalisation.
        log_min_p_B1 = jnp.log(jnp.maximum(params.min_p_B, 1e-30))[:, None]
        ok_BK = sorted_BK - sorted_BK[:, :1] >= log_min_p_B1
        keep_BK &= ok_BK | (params.min_p_B[:, None] <= 0)
    count_B = jnp.sum(keep_BK, axis=1)
    return jnp.take_along_axis(sorted_BK, (count_B - 1)[:, None], axis=1)[:, 0]


def sample(logits_BV: jax.Array, params: SamplingParams, flags: SamplingFlags, *,
           step: jax.Array, seen_BV: jax.Array | None = None,
           allowed_BV: jax.Array | None = None,
           generated_BM: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row.

    Args:
      logits_BV: the model's float32 logits.
      params: per-row settings.  flags: static switches.
      step: int32 scalar, the index of the token being drawn (folded into each row's key);
        or int32 [B], each row's own index (continuous batching).
      seen_BV: bool presence mask for the repetition penalty (required when it is on).
      allowed_BV: optional bool mask (a constraint): other tokens get -inf before the
        penalty, greedy choice, temperature and filters, so every mode respects it.
      generated_BM: the tokens generated so far (the first `step`), for the presence and
        frequency penalties (required when they are on).
    Returns:
      (tokens_B int32, logprobs_B float32). The log-prob is that of the token under the
      model's raw distribution: log_softmax of the unmodified logits (temperature 1, no
      penalty, filtering or mask), which is what scoring and SAMI need.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    scores_BV = logits_BV
    if allowed_BV is not None:
        scores_BV = jnp.where(allowed_BV, scores_BV, _NEG_INF)
    if flags.repetition_penalty:
        scores_BV = apply_repetition_penalty(scores_BV, seen_BV, params.repetition_penalty_B)
    if flags.penalties:
        scores_BV = apply_openai_penalties(scores_BV, generated_BM, step,
                                           params.presence_penalty_B,
                                           params.frequency_penalty_B)
    if flags.logit_bias:
        scores_BV = scores_BV + params.logit_bias_BV
    tokens_B = jnp.argmax(scores_BV, axis=-1).astype(jnp.int32)
    if flags.sample:
        temp_B = params.temperature_B
        scaled_BV = scores_BV / jnp.where(temp_B > 0, temp_B, 1.0)[:, None]
        if flags.top_k or flags.top_p or flags.min_p:
            k = min(flags.top_k_max, scaled_BV.shape[1]) or scaled_BV.shape[1]
            sorted_BK, _ = jax.lax.top_k(scaled_BV, k)
            threshold_B = keep_threshold(sorted_BK, params, flags)
            # Filtered in vocabulary order, not sorted order: a row's draw (Gumbel noise per
            # token id) is then the same whichever filters its batch-mates compiled in.
            scaled_BV = jnp.where(scaled_BV >= threshold_B[:, None], scaled_BV, _NEG_INF)
        step = jnp.asarray(step)
        keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, 0 if step.ndim else None))(
            params.key_B, step)
        pick_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BV).astype(jnp.int32)
        tokens_B = jnp.where(temp_B > 0, pick_B, tokens_B)
    logprobs_B = jnp.take_along_axis(logp_BV, tokens_B[:, None], axis=1)[:, 0]
    return tokens_B, logprobs_B


def row_seed(seed: int, index: int) -> int:
    """The sampling seed of row `index` of a request with `seed` (index 0 keeps the seed).

    Args:
      seed: the request's seed (any int; reduced to uint32).
      index: the prompt's position in the request.
    Returns:
      A uint32 seed.
    """
    seed = int(seed) % 2**32
    if index == 0:
        return seed
    # splitmix-style mixing: rows of one request get unrelated streams.
    x = (seed * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9) % 2**64
    x ^= x >> 31
    return (x * 0x94D049BB133111EB % 2**64) >> 32
