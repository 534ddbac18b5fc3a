"""Continuations scored from the prompt's prefill cache equal an uncached forward in numpy.

`score_continuations` runs a prompt once and extends its cache with each continuation;
`generate(..., continuations=...)` does the same inside the generation's own prefill. Both must
give log p(continuation | prompt) of a plain forward over prompt + continuation, and the
generated text must not change.
"""

import dataclasses

import jax
import numpy as np
import pytest
from test_loop import BASE
from test_loop import CONFIGS as LOOP_CONFIGS

from align_jax import sharding
from align_jax.generate import generate, prompt_batches, score_continuations
from align_jax.losses import logprobs
from align_jax.models import transformer

# The generation loop's test models (llama; mistral with a window shorter than prompt +
# continuation, which the extension must honour too; gemma), and a vocabulary above
# logprobs.AUTO_CHUNK_ABOVE for the chunked log-softmax path.
CONFIGS = {**LOOP_CONFIGS,
           "big_vocab": dataclasses.replace(BASE, vocab_size=logprobs.AUTO_CHUNK_ABOVE + 40,
                                            embed_dim=16, head_dim=4, mlp_dim=32)}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [20, 21, 22, 23, 24],
           [30, 31]]
# Mixed counts per prompt (0 to 3) and lengths (1 to 19 tokens, past one bucket of 16).
CONTINUATIONS = [[[40, 41, 42], [43]], [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                          17, 18, 19]], [], [[50], [51, 52], [53, 54, 55]],
                 [[60, 61, 62, 63]]]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _references(cfg, params, prompts=PROMPTS, continuations=CONTINUATIONS):
    """Independent: one uncached forward over every prompt + continuation (right-padded;
    causality keeps the padding out), log-softmax in float64 numpy."""
    seqs = [(p, c) for p, conts in zip(prompts, continuations) for c in conts]
    width = max(len(p) + len(c) for p, c in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    for row, (p, c) in enumerate(seqs):
        tokens[row, :len(p) + len(c)] = list(p) + list(c)
    lp = _log_softmax(np.asarray(transformer.forward(cfg, params, tokens), np.float64))
    flat = [sum(lp[row, len(p) - 1 + j, t] for j, t in enumerate(c))
            for row, (p, c) in enumerate(seqs)]
    out, start = [], 0
    for conts in continuations:
        out.append(flat[start:start + len(conts)])
        start += len(conts)
    return out


class _Models(dict):
    """name -> (config, params), each initialised on first use."""

    def __missing__(self, name):
        cfg = CONFIGS[name]
        self[name] = cfg, transformer.init_params(cfg, jax.random.key(list(CONFIGS).index(name)))
        return self[name]


@pytest.fixture(scope="module")
def models():
    return _Models()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scores_equal_uncached_forward(models, name):
    cfg, params = models[name]
    # batch_size 2: three batches, two prompt buckets, and a filler row in the last batch.
    got = score_continuations(cfg, params, PROMPTS, CONTINUATIONS, batch_size=2)
    assert [len(g) for g in got] == [len(c) for c in CONTINUATIONS]
    for scores, want in zip(got, _references(cfg, params)):
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=2e-4)


def test_generate_scores_from_its_prefill_and_text_is_unchanged(models):
    cfg, params = models["llama"]
    plain = generate(cfg, params, PROMPTS, max_new_tokens=6, batch_size=4)
    scored = generate(cfg, params, PROMPTS, max_new_tokens=6, batch_size=4,
                      continuations=CONTINUATIONS)
    assert scored.tokens == plain.tokens and plain.continuation_logps is None
    np.testing.assert_allclose(np.concatenate(scored.logprobs), np.concatenate(plain.logprobs),
                               atol=1e-5)
    alone = score_continuations(cfg, params, PROMPTS, CONTINUATIONS, batch_size=4)
    for got, want in zip(scored.continuation_logps, alone):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # A continuation longer than the generation budget (19 > 6) got a longer copy of the
    # cache; with a budget of 40 the extension uses a cut copy. Same scores either way.
    np.testing.assert_allclose(scored.continuation_logps[1], _references(cfg, params)[1],
                               atol=2e-4)
    longer = generate(cfg, params, PROMPTS, max_new_tokens=40, batch_size=4,
                      continuations=CONTINUATIONS)
    for got, want in zip(longer.continuation_logps, alone):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_batches_group_alike_continuations():
    """Within a prompt bucket, rows are ordered by (number, longest) of their continuations,
    so a batch's [K, A] layout is mostly real tokens; without a key, by prompt length."""
    prompts = [[1] * n for n in (3, 5, 4, 6, 20)]
    key = [(1, 30), (2, 5), (1, 4), (2, 40), (1, 1)]
    batches = prompt_batches.plan_batches(prompts, batch_size=2, cap=64, order_key=key)
    # 3-6 tokens share the 16 bucket, 20 tokens is alone in the 32 bucket.
    assert [b.indices for b in batches] == [(2, 0), (1, 3), (4,)]
    plain = prompt_batches.plan_batches(prompts, batch_size=2, cap=64)
    assert [b.indices for b in plain] == [(0, 2), (1, 3), (4,)]


def test_sharded_scores_equal_single_device(models):
    assert len(jax.devices()) == 8
    cfg, params = models["llama"]
    want = score_continuations(cfg, params, PROMPTS, CONTINUATIONS, batch_size=8)
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    for rules in ("dp", "fsdp_tp"):
        got = score_continuations(cfg, params, PROMPTS, CONTINUATIONS, batch_size=8, mesh=mesh,
                                  rules=rules)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-4)


@pytest.mark.parametrize("conts, match", [
    ([[[1]]] * 4, "continuations has 4 entries for 5 prompts"),
    ([[[1]], [[]], [], [], []], "continuation 0 of prompt 1 is empty"),
    ([[[1]], [[2]], [[3, 64]], [], []], "continuation 0 of prompt 2 has token id 64"),
    ([[[1]], [[2]], [[3]], [[1] * 124], []], r"prompt 3 \(5 tokens\) and its continuation 0 "
                                             r"\(124 tokens\) exceed max_len=128"),
])
def test_bad_continuations_name_the_prompt(models, conts, match):
    cfg, params = models["llama"]
    with pytest.raises(ValueError, match=match):
        score_continuations(cfg, params, PROMPTS, conts)
    with pytest.raises(ValueError, match=match):
        generate(cfg, params, PROMPTS, max_new_tokens=2, continuations=conts)
