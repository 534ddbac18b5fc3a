"""Shared-prefix prefill: sharing a batch's common prefix changes nothing but the work.

With `share_prefix=True` the prefill runs the prompts' common prefix once and copies its keys
and values into every row; the generated tokens must be those of `share_prefix=False` token
for token (greedy, sampled with fixed seeds, penalised, constrained), and the log-probs equal
within float32 rounding: the prefix pass computes the same sums for the same tokens, but in
another batch shape, so XLA may tile and order its reductions differently. Over two tiny
layers of width 32 such differences stay around 1e-6 (a few float32 ulps of values of
order 1, carried through softmax and the log-softmax); 1e-4 leaves room for other CPUs'
kernels, as the loop's other float32 comparisons do.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from align_jax import sharding
from align_jax.generate import (
    batch_inputs,
    generate,
    loop,
    prefix,
    prompt_batches,
    sampling,
    score_continuations,
)
from align_jax.generate import constraints as C
from align_jax.models import transformer
from align_jax.models.config import ModelConfig, get_config
from align_jax.tokenizer_training import train_tokenizer

BASE = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=64, max_position=128, init_std=0.3, eos_token_id=None)
CONFIGS = {
    "llama": BASE,
    # A window (20) shorter than most prompts (17 to 46 tokens), so it cuts their attention,
    # and long enough that the last prompt tokens still see, through two layers, keys and
    # values that came from the shared pass (positions 0 to 13 of the longest row).
    "mistral": dataclasses.replace(BASE, family="mistral", sliding_window=20),
    "gemma": dataclasses.replace(BASE, family="gemma", activation="gelu_tanh", norm_offset=1.0,
                                 scale_embeddings=True, tie_embeddings=True, num_kv_heads=1),
    # Learned absolute positions: a token's position embedding must not depend on its slot.
    "gpt2": dataclasses.replace(BASE, family="gpt2", norm="layer", positions="learned",
                                num_kv_heads=4, gated_mlp=False, activation="gelu_tanh",
                                qkv_bias=True, out_bias=True, mlp_bias=True,
                                tie_embeddings=True),
    # Partial rotary, a shared norm for parallel attention and MLP, a head bias.
    "phi": dataclasses.replace(BASE, family="phi", norm="layer", gated_mlp=False,
                               activation="gelu_tanh", rope_fraction=0.5,
                               residual="parallel_shared_norm", qkv_bias=True, out_bias=True,
                               mlp_bias=True, head_bias=True),
}
_RNG = np.random.default_rng(0)
PREFIX = [int(t) for t in _RNG.integers(1, 64, size=16)]
# Suffixes of 1 to 30 tokens: the suffix block is 32 slots, so the 1-token row's padding (31)
# covers all of its prefix (recomputed in the suffix block) and the others take 1 to 14
# prefix tokens from the shared pass (the rest of theirs is recomputed too).
PROMPTS = [PREFIX + [int(t) for t in _RNG.integers(1, 64, size=n)]
           for n in (20, 25, 1, 30, 17, 28)]
# One call covers every sampling mode, one per row: greedy, sampled, filtered, penalised
# (the penalty must see the prefix tokens), sampled hot, greedy penalised.
MODES = dict(temperature=[0.0, 1.0, 0.8, 1.2, 1.5, 0.0], top_k=[0, 0, 20, 0, 0, 0],
             top_p=[1.0, 1.0, 0.9, 1.0, 1.0, 1.0], repetition_penalty=[1.0, 1.0, 1.0, 1.5, 1.0,
                                                                      3.0], seed=3)
ATOL = 1e-4  # float32 reduction order of a different batch shape (module docstring)


def _params(cfg, seed=0):
    """Random params with every leaf moved off its init (biases, norms, the head bias)."""
    params = transformer.init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _assert_same(shared, plain):
    assert shared.tokens == plain.tokens
    assert shared.finish_reasons == plain.finish_reasons
    for a, b in zip(shared.logprobs, plain.logprobs):
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_common_prefix_and_rounding():
    assert prefix.common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert prefix.common_prefix_len([[1, 2], [3]]) == 0
    assert prefix.common_prefix_len([[7, 8, 9]]) == 3
    # At most four significant bits: 8 sizes an octave, never above n.
    assert [prefix.round_prefix(n) for n in (0, 5, 15, 16, 17, 31, 130, 179, 1000)] == \
        [0, 5, 15, 16, 16, 30, 128, 176, 960]
    sizes = {prefix.round_prefix(n) for n in range(128, 256)}
    assert len(sizes) == 8 and all(prefix.round_prefix(n) <= n for n in range(1, 3000))


def test_shared_layout_is_the_unshared_layout_of_its_length():
    (batch,) = prompt_batches.plan_batches(PROMPTS, batch_size=8, cap=100)
    shared = prefix.share(batch, PROMPTS, config=BASE, mode=True, cap=100, pad_id=0)
    p = shared.prefix_1T.shape[1]
    assert p == 16 and shared.prefix_1T.tolist() == [PREFIX]
    # 16 prefix slots and a suffix block of 32 (the longest suffix, 30, bucketed).
    t = shared.tokens_BT.shape[1]
    assert t == 16 + 32 and batch.tokens_BT.shape[1] == 64
    plain = prompt_batches.layout(PROMPTS, batch.indices, batch_size=8, length=t)
    for name in ("tokens_BT", "positions_BT", "segment_ids_BT", "lengths_B", "active_B"):
        np.testing.assert_array_equal(getattr(shared, name), getattr(plain, name))
    # Every real slot below P holds a prefix token at the position it has in the prefix.
    real = shared.segment_ids_BT[:, :p] > 0
    np.testing.assert_array_equal(shared.tokens_BT[:, :p][real],
                                  np.asarray(PREFIX)[shared.positions_BT[:, :p][real]])
    counts = [prefix.shared_tokens(shared, r) for r in range(len(batch.indices))]
    assert counts == [max(0, len(PROMPTS[i]) - 32) for i in batch.indices]
    assert prefix.share(batch, PROMPTS, config=BASE, mode=False, cap=100, pad_id=0) is batch


def test_when_sharing_applies():
    many = [PREFIX * 4 + [i, i + 1] for i in range(8)]  # 64 common tokens, 2-token suffixes
    (batch,) = prompt_batches.plan_batches(many, batch_size=8, cap=100)
    auto = prefix.share(batch, many, config=BASE, mode=None, cap=100, pad_id=0)
    assert auto.prefix_1T is not None and auto.prefix_1T.shape[1] == 64
    # One row: nothing to share with.
    (one,) = prompt_batches.plan_batches(many[:1], batch_size=1, cap=100)
    assert prefix.share(one, many[:1], config=BASE, mode=None, cap=100, pad_id=0) is one
    # A short common prefix does not pay; forced, it is shared all the same.
    short = [[1, 2, 3] + [int(t) for t in _RNG.integers(4, 64, size=40)] for _ in range(8)]
    (batch,) = prompt_batches.plan_batches(short, batch_size=8, cap=100)
    assert prefix.share(batch, short, config=BASE, mode=None, cap=100, pad_id=0) is batch
    assert prefix.share(batch, short, config=BASE, mode=True, cap=100,
                        pad_id=0).prefix_1T.shape[1] == 3
    # No common token: nothing to share even when forced.
    apart = [[1, 2, 3], [4, 5, 6]]
    (batch,) = prompt_batches.plan_batches(apart, batch_size=2, cap=100)
    assert prefix.share(batch, apart, config=BASE, mode=True, cap=100, pad_id=0) is batch
    # A mixture of experts that can drop tokens routes by the tokens of each pass: its
    # results would change, so it is not shared by default.
    moe = dataclasses.replace(BASE, family="mixtral", num_experts=4, experts_per_token=2,
                              capacity_factor=1.0)
    (batch,) = prompt_batches.plan_batches(many, batch_size=8, cap=100)
    assert prefix.share(batch, many, config=moe, mode=None, cap=100, pad_id=0) is batch
    roomy = dataclasses.replace(moe, capacity_factor=2.0)  # C = T: drops nothing
    assert prefix.share(batch, many, config=roomy, mode=None, cap=100,
                        pad_id=0).prefix_1T is not None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shared_prefix_generates_what_the_unshared_prefill_does(name):
    cfg = CONFIGS[name]
    params = _params(cfg)
    kw = dict(max_new_tokens=8, stop_token_ids=[3], **MODES)
    plain = generate(cfg, params, PROMPTS, share_prefix=False, **kw)
    shared = generate(cfg, params, PROMPTS, share_prefix=True, **kw)
    _assert_same(shared, plain)
    assert plain.shared_prefix_tokens == [0] * len(PROMPTS)
    assert shared.shared_prefix_tokens == [max(0, len(p) - 32) for p in PROMPTS]


def test_prefix_path_runs_only_when_prompts_share_a_prefix():
    cfg = dataclasses.replace(BASE, max_position=120)  # fresh shapes to count
    params = _params(cfg)
    template = PREFIX * 3  # 48 common tokens, 1 to 6 more per prompt
    shared_prompts = [template + [int(t) for t in _RNG.integers(1, 64, size=n)]
                      for n in (1, 4, 6, 2)]
    before = loop.trace_counts()
    out = generate(cfg, params, shared_prompts, max_new_tokens=4)  # the default: automatic
    after = loop.trace_counts()
    assert after.get("prefix", 0) - before.get("prefix", 0) == 1
    assert all(n > 0 for n in out.shared_prefix_tokens)
    _assert_same(out, generate(cfg, params, shared_prompts, max_new_tokens=4,
                               share_prefix=False))
    # Prompts with nothing in common: the plain prefill (and nothing traced with a prefix).
    apart = [[int(t) for t in _RNG.integers(1, 64, size=n)] for n in (50, 53, 49, 52)]
    apart = [[i + 1] + p for i, p in enumerate(apart)]
    before = loop.trace_counts()
    out = generate(cfg, params, apart, max_new_tokens=4)
    assert loop.trace_counts().get("prefix", 0) == before.get("prefix", 0)
    assert out.shared_prefix_tokens == [0] * 4
    # Another template of the same rounded length and suffix bucket reuses the compilation.
    other = [[t % 63 + 1 for t in p[:48]] + p[48:] for p in shared_prompts]
    before = loop.trace_counts()
    out = generate(cfg, params, other, max_new_tokens=4)
    assert loop.trace_counts() == before and all(n > 0 for n in out.shared_prefix_tokens)
    with pytest.raises(ValueError, match="share_prefix must be None, True or False"):
        generate(cfg, params, apart, max_new_tokens=4, share_prefix="yes")


def test_continuations_score_the_same_from_a_shared_prefix():
    cfg = CONFIGS["mistral"]
    params = _params(cfg)
    conts = [[[40, 41, 42], [43]], [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]],
             [], [[50], [51, 52]], [[60, 61]], [[9]]]
    kw = dict(max_new_tokens=6, continuations=conts)
    plain = generate(cfg, params, PROMPTS, share_prefix=False, **kw)
    shared = generate(cfg, params, PROMPTS, share_prefix=True, **kw)
    _assert_same(shared, plain)
    assert any(shared.shared_prefix_tokens)
    for a, b in zip(shared.continuation_logps, plain.continuation_logps):
        np.testing.assert_allclose(a, b, atol=ATOL)
    before = loop.trace_counts().get("prefix", 0)
    scored = score_continuations(cfg, params, PROMPTS, conts, share_prefix=True)
    assert loop.trace_counts().get("prefix", 0) > before
    for a, b in zip(scored, plain.continuation_logps):
        np.testing.assert_allclose(a, b, atol=ATOL)


@pytest.mark.parametrize("rules", ["dp", "fsdp_tp"])
def test_sharded_shared_prefix_equals_single_device(rules):
    """The prefix pass (batch 1) is replicated over the batch axes; rows stay sharded."""
    assert len(jax.devices()) == 8
    params = _params(BASE)
    kw = dict(max_new_tokens=8, batch_size=8, **MODES)
    single = generate(BASE, params, PROMPTS, share_prefix=False, **kw)
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    out = generate(BASE, params, PROMPTS, share_prefix=True, mesh=mesh, rules=rules, **kw)
    assert any(out.shared_prefix_tokens)
    _assert_same(out, single)


def test_shared_prefill_keeps_the_cache_batch_sharded():
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    params = transformer.init_params(BASE, jax.random.key(0), mesh=mesh, rules="fsdp_tp")
    (batch,) = prompt_batches.plan_batches(PROMPTS, batch_size=8, cap=100)
    batch = prefix.share(batch, PROMPTS, config=BASE, mode=True, cap=100, pad_id=0)
    sampler, flags = sampling.make_sampling(8)
    arrays = batch_inputs.place((batch.tokens_BT, batch.positions_BT, batch.segment_ids_BT,
                          batch.active_B, sampler), mesh, "fsdp_tp")
    prefix_1T = batch_inputs.place(batch.prefix_1T, mesh, "fsdp_tp")
    assert prefix_1T.sharding.is_fully_replicated
    stop_ids = jax.device_put(np.full((8,), -1, np.int32), sharding.replicated(mesh))
    before = loop.trace_counts().get("prefix", 0)
    with sharding.use_mesh(mesh, "fsdp_tp"):
        state = loop.jit_prefill(params, *arrays, stop_ids, prefix_1T=prefix_1T, config=BASE,
                                 flags=flags, max_new_tokens=4,
                                 cache_len=batch.tokens_BT.shape[1] + 3, mesh=mesh,
                                 rules="fsdp_tp")
    assert loop.trace_counts()["prefix"] == before + 1
    batch_axes = ("data", "fsdp")
    assert state.cache["k"].sharding.spec == P(None, batch_axes, None, "tensor")
    assert state.cache["segment_ids"].sharding.spec == P(batch_axes)
    assert int(state.cache["index"]) == batch.tokens_BT.shape[1]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    text = ["The quick brown fox jumps over the lazy dog near the river bank.",
            "Honesty, care, fairness and respect are values we write down and keep: yes or no?"]
    tok = train_tokenizer(text * 20, tmp_path_factory.mktemp("tok"), vocab_size=300)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=192, init_std=0.3,
                     tie_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    return tok, cfg, transformer.init_params(cfg, jax.random.key(0))


def test_constrained_rows_from_a_shared_prefix(text_model):
    """The first constrained token is drawn in the prefill, from the suffix pass's logits."""
    tok, cfg, params = text_model
    head = tok.encode("Answer yes or no, then say why. The quick brown fox jumps over the "
                      "lazy dog. Honesty and care:", add_bos=True)
    prompts = [head + tok.encode(t) for t in (" fox", " a dog near the river", " respect",
                                              " fairness and care")]
    per = [C.regex(r"(yes|no), [a-z]{2,8}( [a-z]{2,8}){0,2}\."), None,
           C.choice(["fairness", "care", "respect"]), C.regex(r"(yes|no)\.")]
    kw = dict(max_new_tokens=24, tokenizer=tok, constraint=per, stop_strings=["river"],
              temperature=[0.0, 1.0, 0.9, 1.2], repetition_penalty=[1.0, 1.3, 1.0, 1.0], seed=5)
    plain = generate(cfg, params, prompts, share_prefix=False, **kw)
    shared = generate(cfg, params, prompts, share_prefix=True, **kw)
    _assert_same(shared, plain)
    assert shared.texts == plain.texts and shared.incomplete == plain.incomplete
    assert all(n > 0 for n in shared.shared_prefix_tokens)
