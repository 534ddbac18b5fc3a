"""Constrained generation on a tiny random model: outputs match their constraint (greedy and
sampled), unconstrained rows are untouched, mixed batches, 8 sharded devices, streaming."""

import json
import re

import jax
import jsonschema
import numpy as np
import pytest

from align_jax import sharding
from align_jax.generate import constraints as C
from align_jax.generate import generate, generate_stream
from align_jax.models import transformer
from align_jax.models.config import get_config
from align_jax.tokenizer_training import train_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "Honesty, care, fairness and respect are values we write down and keep: yes or no?",
        'Answers like {"answer": "yes", "score": 3} are JSON, and so is [1, 2].']
SCHEMA = {"type": "object", "properties": {
    "answer": {"enum": ["yes", "no"]},
    "score": {"type": "integer", "minimum": 1, "maximum": 5},
    "why": {"type": "string", "maxLength": 20},
    "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
    "required": ["answer", "score", "why"], "additionalProperties": False}
REGEX = r"(yes|no), [a-z]{2,8}( [a-z]{2,8}){0,2}\."
CHOICES = ["fairness", "care", "respect"]
# Per prompt: greedy, sampled, filtered (top-k, top-p, min-p), penalised, sampled again: one
# call (one compilation) covers every sampling mode.
MODES = dict(temperature=[0.0, 1.0, 0.8, 1.2, 1.5], top_k=[0, 0, 20, 0, 0],
             top_p=[1.0, 1.0, 0.9, 1.0, 1.0], min_p=[0.0, 0.0, 0.05, 0.0, 0.0],
             repetition_penalty=[1.0, 1.0, 1.0, 1.3, 1.0], seed=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = train_tokenizer(TEXT * 20, tmp_path_factory.mktemp("tok"), vocab_size=340)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=192, init_std=0.3,
                     tie_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    params = transformer.init_params(cfg, jax.random.key(0))
    prompts = [tok.encode(t, add_bos=True) for t in ("The quick", "Honesty and", "Answers",
                                                     "A", "yes or no")]
    return tok, cfg, params, prompts


def _check(c: C.Constraint, text: str) -> bool:
    """An independent check: re.fullmatch, membership, or jsonschema."""
    if c.kind == "regex":
        return re.fullmatch(c.payload, text) is not None
    if c.kind == "choice":
        return text in json.loads(c.payload)
    try:
        jsonschema.validate(json.loads(text), json.loads(c.payload))
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


@pytest.mark.parametrize("make", [lambda: C.regex(REGEX), lambda: C.choice(CHOICES),
                                  lambda: C.json_schema(SCHEMA)], ids=["regex", "choice", "schema"])
def test_outputs_match_their_constraint(model, make):
    tok, cfg, params, prompts = model
    c = make()
    out = generate(cfg, params, prompts, max_new_tokens=80, tokenizer=tok, constraint=c,
                   **MODES)
    assert out.incomplete is not None
    for text, reason, incomplete, toks in zip(out.texts, out.finish_reasons, out.incomplete,
                                              out.tokens):
        assert not set(toks[:-1]) & set(tok.eos_ids)
        if incomplete:  # only when the budget ran out first
            assert reason == "length" and len(toks) == 80 and not _check(c, text)
        else:
            assert _check(c, text), text
            assert reason == "stop" and toks[-1] in tok.eos_ids
    assert sum(out.incomplete) <= 1, out.texts  # the budget is ample for these


def test_a_budget_too_small_ends_with_length_and_incomplete(model):
    tok, cfg, params, prompts = model
    short = generate(cfg, params, prompts, max_new_tokens=3, tokenizer=tok,
                     constraint=C.regex("[a-z]{30}"))
    assert short.finish_reasons == ["length"] * len(prompts) and all(short.incomplete)
    assert all(re.fullmatch("[a-z]*", t) for t in short.texts)


def test_logprobs_are_those_of_the_unmasked_model(model):
    tok, cfg, params, prompts = model
    out = generate(cfg, params, prompts[:1], max_new_tokens=8, tokenizer=tok,
                   constraint=C.regex("[a-z ]+"))
    for prompt, toks, lps in zip(prompts, out.tokens, out.logprobs):
        seq = np.asarray([prompt + toks], np.int32)
        logits = np.asarray(transformer.forward(cfg, params, seq)[0])[len(prompt) - 1:-1]
        ref = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(toks)), toks]
        np.testing.assert_allclose(lps, ref, atol=1e-4)  # float32 cached vs full forward


def test_mixed_batch_rows_are_independent(model):
    tok, cfg, params, prompts = model
    per = [None, C.choice(CHOICES), C.json_schema(SCHEMA), None, C.regex(REGEX)]
    for kw in (dict(temperature=1.0, seed=3),):  # greedy rows: test_outputs_match...
        free = generate(cfg, params, prompts, max_new_tokens=24, tokenizer=tok, **kw)
        mixed = generate(cfg, params, prompts, max_new_tokens=24, tokenizer=tok,
                         constraint=per, **kw)
        for i, c in enumerate(per):
            if c is None:  # token for token what an unconstrained call draws
                assert mixed.tokens[i] == free.tokens[i] and not mixed.incomplete[i]
                np.testing.assert_allclose(mixed.logprobs[i], free.logprobs[i], atol=1e-6)
            else:
                alone = generate(cfg, params, prompts, max_new_tokens=24, tokenizer=tok,
                                 constraint=c, **kw)
                assert mixed.tokens[i] == alone.tokens[i]
                assert mixed.incomplete[i] or _check(c, mixed.texts[i])


def test_unconstrained_calls_compile_nothing_new(model):
    from align_jax.generate import loop

    tok, cfg, params, prompts = model
    generate(cfg, params, prompts, max_new_tokens=8, tokenizer=tok)
    before = loop.trace_counts()
    a = generate(cfg, params, prompts, max_new_tokens=8, tokenizer=tok)
    assert loop.trace_counts() == before and a.incomplete is None
    # Two constraints of similar size share the compiled (bucketed) tables.
    generate(cfg, params, prompts, max_new_tokens=8, tokenizer=tok, constraint=C.regex("[a-z]+"))
    before = loop.trace_counts()
    generate(cfg, params, prompts, max_new_tokens=8, tokenizer=tok, constraint=C.regex("[a-c]+"))
    assert loop.trace_counts() == before


def test_sharded_equals_single_device(model):
    tok, cfg, params, prompts = model
    assert len(jax.devices()) == 8
    per = [C.json_schema(SCHEMA), None, C.choice(CHOICES), C.regex(REGEX), C.json_schema(SCHEMA)]
    kw = dict(max_new_tokens=32, tokenizer=tok, constraint=per, batch_size=8, temperature=0.9,
              seed=2)
    single = generate(cfg, params, prompts, **kw)
    mesh = sharding.make_mesh(sharding.MeshSpec(data=2, fsdp=2, tensor=2))
    out = generate(cfg, params, prompts, mesh=mesh, rules="fsdp_tp", **kw)
    assert out.tokens == single.tokens and out.incomplete == single.incomplete
    for a, b in zip(out.logprobs, single.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)  # sharded float32 reductions


def test_stream_partials_are_prefixes_and_stop_strings_still_cut(model):
    tok, cfg, params, prompts = model
    c = C.json_schema(SCHEMA)
    final = generate(cfg, params, prompts, max_new_tokens=64, tokenizer=tok, constraint=c)
    seen: dict[int, str] = {}
    for comp in generate_stream(cfg, params, prompts, max_new_tokens=64, tokenizer=tok,
                                constraint=c, partial=True, chunk_size=4):
        if comp.finish_reason is None:
            assert final.texts[comp.index].startswith(comp.text)
            assert len(comp.text) >= len(seen.get(comp.index, ""))
            seen[comp.index] = comp.text
        else:
            assert comp.text == final.texts[comp.index]
    assert seen, "expected partial results"
    cut = generate(cfg, params, prompts, max_new_tokens=64, tokenizer=tok, constraint=c,
                   stop_strings=['"score"'])
    for text, reason, incomplete in zip(cut.texts, cut.finish_reasons, cut.incomplete):
        assert reason == "stop" and incomplete and '"score"' not in text


def test_bad_arguments(model):
    tok, cfg, params, prompts = model
    with pytest.raises(ValueError, match="constraint needs the model's tokenizer"):
        generate(cfg, params, prompts, max_new_tokens=4, constraint=C.regex("a+"))
    with pytest.raises(ValueError, match="constraint has 2 entries for 5 prompts"):
        generate(cfg, params, prompts, max_new_tokens=4, tokenizer=tok,
                 constraint=[None, C.regex("a+")])
    with pytest.raises(TypeError, match="must be a Constraint"):
        generate(cfg, params, prompts, max_new_tokens=4, tokenizer=tok, constraint="a+")
