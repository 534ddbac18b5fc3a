"""The generation loop against full (uncached) forward passes, and its batching contract."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.generate import loop, prompt_batches
from align_jax.models import blockwise, transformer
from align_jax.models.config import ModelConfig

BASE = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=64, max_position=128, init_std=0.3, eos_token_id=None)
CONFIGS = {
    "llama": BASE,
    # A window shorter than prompt + generation, so decode must honour it.
    "sliding": dataclasses.replace(BASE, family="mistral", sliding_window=4),
    "gemma": dataclasses.replace(BASE, family="gemma", activation="gelu_tanh", norm_offset=1.0,
                                 scale_embeddings=True, tie_embeddings=True, num_kv_heads=1),
}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def models():
    return {name: (cfg, transformer.init_params(cfg, jax.random.key(i)))
            for i, (name, cfg) in enumerate(CONFIGS.items())}


def _full_logits(cfg, params, seq):
    return np.asarray(transformer.forward(cfg, params, np.asarray([seq], np.int32))[0])


def _nan_cache(cfg, batch, slots):
    """An empty cache whose unwritten slots hold NaN: reading one would poison the logits."""
    cache = transformer.init_cache(cfg, batch, slots)
    return {**cache, "k": jnp.full_like(cache["k"], jnp.nan),
            "v": jnp.full_like(cache["v"], jnp.nan)}


def _cached_and_full_logits(cfg, params, prompts, *, steps, slots):
    """Drives the model exactly as the loop lays a batch out (left padding, shared index) in
    a cache of `slots` slots; returns every step's logits, cached and from one full forward
    ([B, steps + 1, V] each)."""
    (batch,) = prompt_batches.plan_batches(prompts, batch_size=len(prompts), cap=slots)
    t = batch.tokens_BT.shape[1]
    b = len(prompts)
    step_fn = jax.jit(functools.partial(transformer.forward_with_cache, cfg))
    cache = _nan_cache(cfg, b, max(slots, t + steps))
    logits, cache = step_fn(params, batch.tokens_BT, cache=cache,
                            positions_BT=batch.positions_BT, segment_ids_BT=batch.segment_ids_BT)
    seqs = [list(prompts[i]) for i in batch.indices]
    cached = [np.asarray(logits[:, -1])]
    for _ in range(steps):
        nxt = cached[-1].argmax(-1).astype(np.int32)
        for row, seq in enumerate(seqs):
            seq.append(int(nxt[row]))
        pos = np.asarray([len(s) - 1 for s in seqs], np.int32)[:, None]
        logits, cache = step_fn(params, nxt[:, None], cache=cache, positions_BT=pos,
                                segment_ids_BT=np.ones((b, 1), np.int32))
        cached.append(np.asarray(logits[:, 0]))
    # One uncached forward over every full sequence (right-padded; causality makes position j
    # depend only on tokens up to j).
    width = max(len(s) for s in seqs)
    tokens = np.zeros((b, width), np.int32)
    segments = np.zeros((b, width), np.int32)
    for row, seq in enumerate(seqs):
        tokens[row, :len(seq)], segments[row, :len(seq)] = seq, 1
    full = np.asarray(transformer.forward(cfg, params, tokens, segment_ids_BT=segments))
    got = np.stack([np.stack(cached)[:, row] for row in range(b)])      # [B, steps + 1, V]
    want = np.stack([full[row, len(seq) - steps - 1:len(seq)] for row, seq in enumerate(seqs)])
    return got, want


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_logits_equal_full_forward(models, name):
    cfg, params = models[name]
    got, want = _cached_and_full_logits(cfg, params, PROMPTS, steps=8, slots=64)
    # float32 logits of O(1) summed in another order (cached vs full attention): 1e-4.
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "sliding"])
def test_cached_decode_across_filled_blocks_equals_full_forward(models, name):
    # Prompts of 120 and 60 tokens decoded 16 steps in a 300-slot cache: the filled length
    # crosses the first block boundary (blockwise.FILLED_BLOCK = 128) mid-decode, the
    # sliding window then starts past the first block, and slots 136..299 are never read.
    assert blockwise.FILLED_BLOCK == 128
    cfg, params = models[name]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, cfg.vocab_size, size=n).tolist() for n in (120, 60)]
    got, want = _cached_and_full_logits(cfg, params, prompts, steps=16, slots=300)
    # float32 logits of O(1) summed in another order (cached vs full attention): 1e-4.
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_equals_full_forward_argmax(models, name):
    cfg, params = models[name]
    n = 8
    out = loop.generate(cfg, params, PROMPTS, max_new_tokens=n)
    assert out.finish_reasons == ["length"] * len(PROMPTS)
    assert out.texts is None
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt) + out.tokens[i]
        assert len(out.tokens[i]) == n
        logits = _full_logits(cfg, params, seq)[len(prompt) - 1:-1]
        np.testing.assert_array_equal(logits.argmax(-1), out.tokens[i], err_msg=f"prompt {i}")
        ref_lp = jax.nn.log_softmax(logits, axis=-1)[np.arange(n), out.tokens[i]]
        np.testing.assert_allclose(out.logprobs[i], ref_lp, atol=1e-4)


def test_rows_stop_independently_on_stop_tokens(models):
    cfg, params = models["llama"]
    free = loop.generate(cfg, params, PROMPTS, max_new_tokens=8)
    # Stop on the 4th token of prompt 1's free-running output.
    stop_id = free.tokens[1][3]
    out = loop.generate(cfg, params, PROMPTS, max_new_tokens=8, stop_token_ids=[stop_id])
    for i in range(len(PROMPTS)):
        toks = free.tokens[i]
        if stop_id in toks:
            cut = toks.index(stop_id) + 1
            assert out.tokens[i] == toks[:cut] and out.finish_reasons[i] == "stop"
            assert out.logprobs[i] == pytest.approx(free.logprobs[i][:cut], abs=1e-5)
        else:
            assert out.tokens[i] == toks and out.finish_reasons[i] == "length"
    assert out.finish_reasons[1] == "stop" and len(out.tokens[1]) <= 4
    # The config's EOS id stops rows too, and ignore_eos turns that off.
    eos_cfg = dataclasses.replace(cfg, eos_token_id=stop_id)
    assert loop.generate(eos_cfg, params, PROMPTS, max_new_tokens=8).tokens == out.tokens
    assert loop.generate(eos_cfg, params, PROMPTS, max_new_tokens=8,
                         ignore_eos=True).tokens == free.tokens


def test_results_do_not_depend_on_batching(models):
    """Greedy and seeded sampling give the same tokens whatever the batch layout."""
    cfg, params = models["llama"]
    prompts = PROMPTS + [[1, 2], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]]
    for kw in (dict(), dict(temperature=1.0, top_k=10, seed=3)):
        a = loop.generate(cfg, params, prompts, max_new_tokens=8, batch_size=2, **kw)
        b = loop.generate(cfg, params, prompts, max_new_tokens=8, batch_size=8, **kw)
        assert a.tokens == b.tokens
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-4)


def test_seeds_control_sampling(models):
    cfg, params = models["llama"]
    prompts = [PROMPTS[1]] * 4
    kw = dict(max_new_tokens=8, temperature=1.5)
    a = loop.generate(cfg, params, prompts, seeds=[1, 2, 3, 1], **kw)
    assert a.tokens == loop.generate(cfg, params, prompts, seeds=[1, 2, 3, 1], **kw).tokens
    assert a.tokens[0] == a.tokens[3]
    assert len({tuple(t) for t in a.tokens[:3]}) == 3
    # Without per-row seeds, identical prompts still draw differently (salted by index).
    b = loop.generate(cfg, params, prompts, seed=5, **kw)
    assert len({tuple(t) for t in b.tokens}) > 1
    # Any Python int is a seed (reduced to uint32).
    assert loop.generate(cfg, params, prompts, seed=-1, **kw).tokens == \
        loop.generate(cfg, params, prompts, seed=2**32 - 1, **kw).tokens
    with pytest.raises(ValueError, match="seeds has 2 entries for 4 prompts"):
        loop.generate(cfg, params, prompts, seeds=[1, 2], **kw)


def test_per_prompt_settings_mix_greedy_and_sampled_rows(models):
    cfg, params = models["llama"]
    greedy = loop.generate(cfg, params, PROMPTS, max_new_tokens=8)
    mixed = loop.generate(cfg, params, PROMPTS, max_new_tokens=8, temperature=[0.0, 2.0, 0.0, 2.0],
                          top_k=[0, 100, 0, 5], seed=1)
    assert mixed.tokens[0] == greedy.tokens[0] and mixed.tokens[2] == greedy.tokens[2]
    assert mixed.tokens[1] != greedy.tokens[1]
    # A sampled row with no filters draws the same tokens alone as next to filtered rows.
    kw = dict(max_new_tokens=8, temperature=[2.0, 2.0, 0.5], top_k=[0, 5, 0],
              top_p=[1.0, 0.9, 0.5], seeds=[4, 5, 6])
    together = loop.generate(cfg, params, PROMPTS[:3], **kw)
    alone = loop.generate(cfg, params, PROMPTS[:1], max_new_tokens=8, temperature=2.0, seeds=[4])
    assert together.tokens[0] == alone.tokens[0]
    with pytest.raises(ValueError, match="temperature: expected a scalar or 4 values"):
        loop.generate(cfg, params, PROMPTS, max_new_tokens=2, temperature=[1.0, 2.0])


def test_stream_yields_every_prompt_once(models):
    cfg, params = models["llama"]
    full = loop.generate(cfg, params, PROMPTS, max_new_tokens=8)
    got = {}
    for c in loop.generate_stream(cfg, params, PROMPTS, max_new_tokens=8, batch_size=2,
                                  chunk_size=2):
        assert c.index not in got
        got[c.index] = c.tokens
    assert [got[i] for i in range(len(PROMPTS))] == full.tokens


def test_prompt_longer_than_cache_is_refused(models):
    cfg, params = models["llama"]
    prompts = [[1] * 10, [2] * 120]
    with pytest.raises(ValueError, match=r"prompt 1 has 120 tokens.*max_new_tokens=16.*136.*128"):
        loop.generate(cfg, params, prompts, max_new_tokens=16)
    with pytest.raises(ValueError, match=r"prompt 0 has 10 tokens.*max_len=12"):
        loop.generate(cfg, params, prompts[:1], max_new_tokens=4, max_len=12)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        loop.generate(cfg, params, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt 0 has token id 64"):
        loop.generate(cfg, params, [[64]], max_new_tokens=4)
    # A prompt that exactly fills the cache with its budget works.
    out = loop.generate(cfg, params, [[3] * 12], max_new_tokens=4, max_len=16)
    assert len(out.tokens[0]) == 4


def test_many_prompts_compile_few_shapes(models):
    cfg = dataclasses.replace(CONFIGS["llama"], max_position=96)  # fresh shapes to count
    params = models["llama"][1]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 61, size=100)
    prompts = [list(rng.integers(0, 64, size=n)) for n in lengths]
    before = loop.trace_counts()
    out = loop.generate(cfg, params, prompts, max_new_tokens=2, batch_size=16)
    after = loop.trace_counts()
    buckets = {prompt_batches.bucket_length(n, cap=94) for n in lengths}
    assert buckets == {16, 32, 64}
    for fn in ("prefill", "decode"):
        assert after.get(fn, 0) - before.get(fn, 0) <= len(buckets), (fn, before, after)
    assert [len(t) for t in out.tokens] == [2] * 100
    # Results are in prompt order: spot-check a few against single-prompt generation.
    for i in (0, 57, 99):
        assert loop.generate(cfg, params, [prompts[i]], max_new_tokens=2).tokens[0] == \
            out.tokens[i]
    # A second call with new prompts of the same buckets compiles nothing.
    again = loop.trace_counts()
    loop.generate(cfg, params, prompts[::-1], max_new_tokens=2, batch_size=16)
    assert loop.trace_counts() == again


def test_one_new_token_and_repetition_penalty(models):
    cfg, params = models["llama"]
    out = loop.generate(cfg, params, PROMPTS, max_new_tokens=1)
    assert [len(t) for t in out.tokens] == [1] * 4
    # A huge penalty forbids repeating any prompt or generated token (logits of both signs).
    out = loop.generate(cfg, params, PROMPTS, max_new_tokens=8, repetition_penalty=1e4)
    for prompt, toks in zip(PROMPTS, out.tokens):
        seen = set(prompt)
        for t in toks:
            assert t not in seen
            seen.add(t)


def test_state_is_donated(models):
    cfg, params = models["llama"]
    (batch,) = prompt_batches.plan_batches(PROMPTS, batch_size=4, cap=64)
    from align_jax.generate import sampling  # noqa: PLC0415
    sampler, flags = sampling.make_sampling(4)
    stop_ids = jnp.full((8,), -1, jnp.int32)
    state = loop.jit_prefill(params, batch.tokens_BT, batch.positions_BT, batch.segment_ids_BT,
                             batch.active_B, sampler, stop_ids, config=cfg, flags=flags,
                             max_new_tokens=4, cache_len=batch.tokens_BT.shape[1] + 3,
                             mesh=None, rules="fsdp")
    new = loop.jit_decode(params, state, sampler, stop_ids, jnp.int32(4), config=cfg,
                          flags=flags, mesh=None, rules="fsdp")
    assert int(new.step) == 4
    assert state.cache["k"].is_deleted()


def test_shape_budget_shares_compilations_and_changes_nothing(models):
    cfg = dataclasses.replace(CONFIGS["llama"], max_position=100)  # fresh shapes to count
    params = models["llama"][1]
    plain = {n: loop.generate(cfg, params, PROMPTS, max_new_tokens=n, temperature=0.8, seed=3)
             for n in (3, 7)}
    before = loop.trace_counts()
    shared = {n: loop.generate(cfg, params, PROMPTS, max_new_tokens=n, temperature=0.8, seed=3,
                               shape_budget=16) for n in (3, 7)}
    after = loop.trace_counts()
    for n in (3, 7):
        assert shared[n].tokens == plain[n].tokens
        assert shared[n].finish_reasons == plain[n].finish_reasons
        assert all(len(t) <= n for t in shared[n].tokens)
    # Two budgets, one compiled prefill and one decode.
    assert after["prefill"] - before.get("prefill", 0) == 1
    assert after["decode"] - before.get("decode", 0) == 1
    with pytest.raises(ValueError, match="shape_budget=2 is below max_new_tokens=3"):
        loop.generate(cfg, params, PROMPTS, max_new_tokens=3, shape_budget=2)
