"""Sampler statistics and semantics against independent numpy reasoning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.generate import sampling

V = 40
DRAWS = 2000


def _logits(b=3, seed=0):
    return np.random.default_rng(seed).normal(size=(b, V)).astype(np.float32) * 2.0


@functools.partial(jax.jit, static_argnames=("flags",))
def _draw_many(logits_BV, params, seen_BV, *, flags):
    """DRAWS independent draws per row ([DRAWS, B]) by varying the step folded into the keys."""
    return jax.vmap(lambda st: sampling.sample(logits_BV, params, flags, step=st,
                                               seen_BV=seen_BV)[0])(jnp.arange(DRAWS))


def _sample_counts_raw(logits, **settings):
    b = logits.shape[0]
    params, flags = sampling.make_sampling(b, seeds=list(range(b)), **settings)
    return np.asarray(_draw_many(jnp.asarray(logits), params, jnp.zeros((b, V), bool),
                                 flags=flags))


def _sample_counts(logits, **settings):
    b = logits.shape[0]
    draws = _sample_counts_raw(logits, **settings)
    return np.stack([np.bincount(draws[:, r], minlength=V) for r in range(b)])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_greedy_is_argmax_and_logprob_is_raw_log_softmax():
    logits = _logits()
    params, flags = sampling.make_sampling(3)
    assert not flags.sample
    tokens, logprobs = sampling.sample(jnp.asarray(logits), params, flags, step=jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
    ref = np.log(_softmax(logits.astype(np.float64)))[np.arange(3), logits.argmax(-1)]
    np.testing.assert_allclose(np.asarray(logprobs), ref, atol=1e-5)


def test_temperature_frequencies_follow_scaled_softmax():
    logits = _logits(b=2) / 2
    counts = _sample_counts(logits, temperature=[0.7, 1.5])
    for r, t in enumerate([0.7, 1.5]):
        expected = _softmax(logits[r].astype(np.float64) / t)
        # Total-variation distance of 2000 draws over 40 outcomes stays well under 0.1.
        assert 0.5 * np.abs(counts[r] / DRAWS - expected).sum() < 0.1


def test_top_k_never_leaves_the_k_best():
    logits = _logits()
    counts = _sample_counts(logits, temperature=2.0, top_k=[1, 3, 7])
    for r, k in enumerate([1, 3, 7]):
        best = set(np.argsort(-logits[r])[:k])
        drawn = set(np.nonzero(counts[r])[0])
        assert drawn <= best, (r, drawn - best)
        assert drawn == best  # at temperature 2, each of the k best shows up in 2000 draws


def test_top_k_with_unlimited_rows_sorts_whole_vocab():
    logits = _logits(b=2)
    params, flags = sampling.make_sampling(2, temperature=1.0, top_k=[0, 2])
    assert flags.top_k and flags.top_k_max == 0
    counts = _sample_counts(logits, temperature=1.0, top_k=[0, 2])
    assert len(np.nonzero(counts[0])[0]) > 2
    assert set(np.nonzero(counts[1])[0]) == set(np.argsort(-logits[1])[:2])


def test_tiny_top_p_equals_greedy():
    logits = _logits()
    counts = _sample_counts(logits, temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(counts.argmax(-1), logits.argmax(-1))
    assert (counts.max(-1) == DRAWS).all()


def test_top_p_keeps_exactly_the_nucleus():
    logits = _logits()
    p = 0.6
    counts = _sample_counts(logits, temperature=1.0, top_p=p)
    for r in range(3):
        probs = _softmax(logits[r].astype(np.float64))
        order = np.argsort(-probs)
        mass_above = np.cumsum(probs[order]) - probs[order]
        nucleus = set(order[mass_above < p])
        assert set(np.nonzero(counts[r])[0]) <= nucleus
        # Every nucleus member with a fair share of mass is drawn.
        renorm = probs[list(nucleus)] / probs[list(nucleus)].sum()
        frequent = {t for t, q in zip(nucleus, renorm) if q > 0.01}
        assert frequent <= set(np.nonzero(counts[r])[0])


def test_min_p_drops_tokens_below_fraction_of_best():
    logits = _logits()
    min_p = 0.2
    counts = _sample_counts(logits, temperature=1.0, min_p=min_p)
    for r in range(3):
        probs = _softmax(logits[r].astype(np.float64))
        allowed = set(np.nonzero(probs >= min_p * probs.max())[0])
        assert set(np.nonzero(counts[r])[0]) == allowed


def test_fixed_seed_repeats_and_per_row_seeds_differ():
    logits = jnp.asarray(np.repeat(_logits(b=1), 4, axis=0))

    def run(seeds):
        params, flags = sampling.make_sampling(4, temperature=1.5, seeds=seeds)
        return np.asarray(_draw_many(logits, params, jnp.zeros((4, V), bool), flags=flags))

    a = run([1, 2, 3, 4])
    np.testing.assert_array_equal(a, run([1, 2, 3, 4]))
    for i in range(4):
        for j in range(i + 1, 4):
            assert (a[:, i] != a[:, j]).mean() > 0.5
    same = run([7, 7, 7, 7])
    assert (same == same[:, :1]).all()


def test_a_rows_draws_do_not_depend_on_its_batch_mates_filters():
    logits = _logits(b=2)
    alone = _sample_counts_raw(logits, temperature=[1.0, 1.0])
    mixed = _sample_counts_raw(logits, temperature=[1.0, 1.0], top_k=[0, 3], top_p=[1.0, 0.8],
                               min_p=[0.0, 0.1])
    np.testing.assert_array_equal(alone[:, 0], mixed[:, 0])
    assert not (alone[:, 1] == mixed[:, 1]).all()


def _np_repetition_penalty(logits, seen, penalty):
    out = logits.copy()
    for b in range(logits.shape[0]):
        for v in range(logits.shape[1]):
            if seen[b, v]:
                x = logits[b, v]
                out[b, v] = x / penalty[b] if x > 0 else x * penalty[b]
    return out


def test_repetition_penalty_matches_numpy():
    logits = _logits()
    rng = np.random.default_rng(1)
    seen = rng.random((3, V)) < 0.3
    penalty = np.array([1.0, 1.3, 0.7], np.float32)
    got = sampling.apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen),
                                            jnp.asarray(penalty))
    np.testing.assert_allclose(np.asarray(got), _np_repetition_penalty(logits, seen, penalty),
                               rtol=1e-6)


def test_repetition_penalty_changes_greedy_choice():
    logits = np.zeros((1, V), np.float32)
    logits[0, 5], logits[0, 9] = 2.0, 1.5
    seen = np.zeros((1, V), bool)
    seen[0, 5] = True
    params, flags = sampling.make_sampling(1, repetition_penalty=1.5)
    tokens, logprobs = sampling.sample(jnp.asarray(logits), params, flags, step=jnp.int32(0),
                                       seen_BV=jnp.asarray(seen))
    assert int(tokens[0]) == 9  # 2.0 / 1.5 < 1.5
    # The reported log-prob is under the raw, unpenalised distribution.
    np.testing.assert_allclose(float(logprobs[0]), np.log(_softmax(logits[0])[9]), rtol=1e-5)


@pytest.mark.parametrize("kw, name", [(dict(temperature=-1.0), "temperature"),
                                      (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                                      (dict(min_p=1.5), "min_p"),
                                      (dict(repetition_penalty=0.0), "repetition_penalty")])
def test_bad_settings_are_refused(kw, name):
    with pytest.raises(ValueError, match=name):
        sampling.settings_arrays(2, **kw)
