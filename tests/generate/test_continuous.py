"""Continuous batching (generate/rows.py, continuous.py): rows that join and leave a running
batch give the tokens they give alone, nothing compiles after warm-up, a cancelled row is
freed for the next request, and a short request does not wait for a long one."""

import jax
import numpy as np
import pytest

from align_jax.generate import continuous, generate, loop
from align_jax.models import transformer
from align_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_position=128, init_std=0.3, eos_token_id=None)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [20, 21, 22, 23, 24],
           [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45]]
BUDGETS = [9, 3, 6, 2, 7]
SEEDS = [11, 12, 13, 14, 15]


@pytest.fixture(scope="module")
def model():
    return CFG, transformer.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def engine(model):
    cfg, params = model
    eng = continuous.Engine(cfg, params, engine=continuous.EngineConfig(
        rows=2, max_len=48, chunk=3))
    eng.warm(16)  # one prompt bucket: 16 slots
    return eng, loop.trace_counts()


def _run(eng, reqs):
    out = {}
    for i, r in enumerate(reqs):
        r.index = i
        r.on_done = lambda c, i=i: out.__setitem__(i, c)
        eng.submit(r)
    eng.run()
    return [out[i] for i in range(len(reqs))]


@pytest.mark.parametrize("sampled", [False, True])
def test_rows_joining_and_leaving_give_the_tokens_of_generate(model, engine, sampled):
    cfg, params = model
    eng, _ = engine
    # Sampled rows mix filters, so chunks switch between the SAMPLE and FULL programs.
    settings = [dict(temperature=0.8 if sampled else 0.0, top_k=5 if sampled and i == 2 else 0,
                     repetition_penalty=1.3 if i == 3 else 1.0) for i in range(len(PROMPTS))]
    before = eng.inserts
    got = _run(eng, [continuous.RowRequest(prompt=p, max_tokens=m, settings=s, seed=sd)
                     for p, m, s, sd in zip(PROMPTS, BUDGETS, settings, SEEDS)])
    # Two rows for five requests of different budgets: rows are refilled mid-batch.
    assert eng.inserts - before == len(PROMPTS)
    per_row = {k: [s[k] for s in settings] for k in settings[0]}
    ref = generate(cfg, params, PROMPTS, max_new_tokens=max(BUDGETS), seeds=SEEDS, **per_row)
    for c, toks, m in zip(got, ref.tokens, BUDGETS):
        # A row's draw at step t depends only on its key and t: the longer call's first m
        # tokens are this row's.
        assert c.tokens == toks[:m]
        assert c.finish_reason == "length"
    # Log-probs are float32 sums in another reduction order than generate's batch layout.
    np.testing.assert_allclose(np.concatenate([c.logprobs for c in got]),
                               np.concatenate([t[:m] for t, m in zip(ref.logprobs, BUDGETS)]),
                               atol=1e-4)


def test_nothing_compiles_after_warm_up(engine):
    eng, warm_counts = engine
    _run(eng, [continuous.RowRequest(prompt=[1 + i] * n, max_tokens=m,
                                     settings=dict(temperature=t, top_p=tp), seed=i,
                                     logit_bias={3: 2.0} if i == 1 else None)
               for i, (n, m, t, tp) in enumerate([(1, 4, 0.0, 1.0), (16, 20, 0.7, 0.9),
                                                  (12, 2, 1.0, 1.0), (9, 11, 0.0, 1.0)])])
    counts = loop.trace_counts()
    for name in ("rows_insert", "rows_decode"):
        assert counts[name] == warm_counts[name], (name, counts, warm_counts)


def test_a_cancelled_row_is_freed_for_the_next_request(engine):
    eng, _ = engine
    cancelled = {"a": False}
    done = []
    reqs = [continuous.RowRequest(prompt=[4, 5], max_tokens=40, cancelled=lambda: cancelled["a"],
                                  on_done=done.append),
            continuous.RowRequest(prompt=[6], max_tokens=40, on_done=done.append),
            continuous.RowRequest(prompt=[7, 8, 9], max_tokens=5, on_done=done.append, index=2)]
    for r in reqs:
        eng.submit(r)
    eng.step()
    assert eng.active() == 2 and len(eng.queue) == 1  # the third waits for a row
    cancelled["a"] = True
    n_cancelled = eng.cancelled
    eng.step()  # frees the cancelled row
    eng.step()  # the waiting request takes it
    assert eng.cancelled == n_cancelled + 1
    assert eng.slots[0] is not None and eng.slots[0].req.index == 2
    eng.run()
    # The cancelled request never gets an answer; the two others do.
    assert sorted(c.index for c in done) == [0, 2]
    alone = _run(eng, [continuous.RowRequest(prompt=[7, 8, 9], max_tokens=5)])[0]
    assert [c for c in done if c.index == 2][0].tokens == alone.tokens


def test_a_short_request_does_not_wait_for_a_long_one(engine):
    eng, _ = engine
    done = {}
    eng.submit(continuous.RowRequest(prompt=[1, 2, 3], max_tokens=40, index=0,
                                     on_done=lambda c: done.setdefault(c.index, eng.chunks)))
    eng.step()
    eng.submit(continuous.RowRequest(prompt=[9], max_tokens=4, index=1,
                                     on_done=lambda c: done.setdefault(c.index, eng.chunks)))
    start = eng.chunks
    eng.run()
    # 4 tokens in chunks of 3: the first from its prefill, 3 more in one chunk.
    assert done[1] - start == 1
    assert done[0] > done[1]


def test_stop_token_ends_a_row(model):
    cfg, params = model
    ref = generate(cfg, params, [PROMPTS[1]], max_new_tokens=6).tokens[0]
    eng = continuous.Engine(cfg, params, engine=continuous.EngineConfig(
        rows=2, max_len=48, chunk=3, stop_token_ids=(ref[2],)))
    (c,) = continuous.generate_rows(eng, [PROMPTS[1]], max_new_tokens=6)
    first = ref.index(ref[2])
    assert c.tokens == ref[:first + 1] and c.finish_reason == "stop"


def test_bad_requests_name_the_field(engine):
    eng, _ = engine
    with pytest.raises(ValueError, match="exceed the context"):
        eng.submit(continuous.RowRequest(prompt=[1] * 40, max_tokens=9))
    with pytest.raises(ValueError, match="top_p"):
        eng.submit(continuous.RowRequest(prompt=[1], max_tokens=2, settings=dict(top_p=0.0)))
    with pytest.raises(ValueError, match="token id 99"):
        eng.submit(continuous.RowRequest(prompt=[99], max_tokens=2))
