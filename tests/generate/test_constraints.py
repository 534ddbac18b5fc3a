"""Constraints on the host: the JSON-schema subset and numeric ranges (against brute force),
the byte automata, token tables of each tokenizer kind, and the token masks (against a walk of
every token from every state)."""

import decimal
import itertools
import json
import random
import re

import numpy as np
import pytest

from align_jax.generate import constraints as C
from align_jax.generate.constraints import automaton, schema
from align_jax.tokenizer import load_tokenizer
from align_jax.tokenizer_training import train_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "Honesty, care, fairness and respect are values we write down and keep: yes or no?",
        'Answers like {"answer": "yes", "score": 3} are JSON; café, naïve and 日本 are not ASCII.']


def _dfa_accepts(c: C.Constraint, text: str) -> bool:
    dfa = automaton.byte_dfa(c.pattern)
    s = 0
    for b in text.encode():
        s = int(dfa.delta_QY[s, b])
        if s < 0:
            return False
    return bool(dfa.accepting_Q[s])


@pytest.mark.parametrize("lo,hi", [(0, 0), (3, 17), (0, 1000), (7, None), (95, 1203), (None, -5),
                                   (-120, 37), (-9, -3), (None, None)])
def test_integer_ranges_match_exactly_the_integers_in_range(lo, hi):
    rx = re.compile(schema.integer_range(lo, hi) if (lo, hi) != (None, None)
                    else schema.INTEGER)
    for n in range(-1500, 1500):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(rx.fullmatch(str(n))) == inside, n
    for bad in ("01", "-0", "+3", "1.0", ""):
        assert not rx.fullmatch(bad)


@pytest.mark.parametrize("lo,hi", [("0", "1"), ("0.25", "0.75"), ("-1.5", "2.05"), ("3", None),
                                   (None, "-0.001"), ("0.5", "0.5"), ("10.1", "12.34"),
                                   ("-3.25", "-3.2")])
def test_number_ranges_match_exactly_the_decimals_in_range(lo, hi):
    d = lambda x: None if x is None else decimal.Decimal(x)
    rx = re.compile(schema.number_range(d(lo), d(hi)))
    rng = random.Random(0)
    texts = {f"{rng.choice(['', '-'])}{rng.randint(0, 15)}"
             + rng.choice(["", f".{rng.randint(0, 999):0{rng.randint(1, 3)}d}"])
             for _ in range(6000)}
    texts |= {x for x in (lo, hi) if x} | {"0", "-0", "0.0", "1.0", "0.75000"}
    for t in texts:
        v = decimal.Decimal(t)
        inside = (lo is None or v >= d(lo)) and (hi is None or v <= d(hi))
        # Sound: nothing outside matches. Complete but for the spellings of a negative zero
        # ("-0", "-0.00"), which only ranges reaching below zero produce.
        negative_zero = t.startswith("-") and v == 0
        if not negative_zero or (lo is not None and d(lo) < 0):
            assert bool(rx.fullmatch(t)) == inside, t
        else:
            assert not rx.fullmatch(t) or inside, t
    for bad in ("01", "1.", ".5", "1e3", "+1"):
        assert not rx.fullmatch(bad)


def test_object_properties_in_order_with_optional_ones_left_out():
    spec = {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"type": "null"},
        "d": {"type": "string", "maxLength": 3}}, "required": ["b"],
        "additionalProperties": False}
    c = C.json_schema(spec)
    values = {"a": 5, "b": True, "c": None, "d": "xyz"}
    for keep in itertools.product([False, True], repeat=4):
        obj = {k: v for (k, v), on in zip(values.items(), keep) if on}
        for seps in ((",", ":"), (", ", ": ")):
            text = json.dumps(obj, separators=seps)
            valid = "b" in obj
            assert _dfa_accepts(c, text) == valid, text
            assert c.validate(text) == valid
    assert not _dfa_accepts(c, '{"b": true,  "a": 1}')  # order and tight whitespace
    assert not _dfa_accepts(c, '{"b":true,"d":"abcd"}')  # maxLength
    assert not _dfa_accepts(c, '{"b":true,"e":1}')  # no other properties


def test_arrays_strings_enums_and_unions():
    c = C.json_schema({"type": "array", "items": {"type": ["integer", "null"]},
                       "minItems": 1, "maxItems": 3})
    for text, ok in (("[1]", True), ("[1, null, 3]", True), ("[]", False),
                     ("[1,2,3,4]", False), ('["x"]', False)):
        assert _dfa_accepts(c, text) == ok, text
    c = C.json_schema({"type": "string", "enum": ["yes", "no", 'say "hi"']})
    assert _dfa_accepts(c, '"yes"') and _dfa_accepts(c, json.dumps('say "hi"'))
    assert not _dfa_accepts(c, '"maybe"')
    c = C.json_schema({"type": "string", "minLength": 2, "maxLength": 4})
    assert [_dfa_accepts(c, json.dumps(s)) for s in ("a", "ab", "日本語", "a\nb", "abcde")] == \
        [False, True, True, True, False]
    assert not _dfa_accepts(c, '"a\nb"')  # a raw newline is not JSON


def test_pattern_never_lets_a_raw_quote_or_control_character_through():
    c = C.json_schema({"type": "object", "properties": {"id": {
        "type": "string", "pattern": "^[A-Z].+$"}}, "required": ["id"]})
    assert _dfa_accepts(c, '{"id": "Ab c"}') and _dfa_accepts(c, '{"id": "A\\"b"}')
    assert not _dfa_accepts(c, '{"id": "A"b"}') and not _dfa_accepts(c, '{"id": "ab"}')
    c = C.json_schema({"type": "string", "pattern": "[0-9]{3}"})  # unanchored: contains
    assert _dfa_accepts(c, '"ab123cd"') and not _dfa_accepts(c, '"ab12cd"')


@pytest.mark.parametrize("spec,needle", [
    ({"type": "object", "properties": {"d": {"type": "string", "format": "date"}}},
     "$.properties.d: keyword 'format' is not supported for type \"string\""),
    ({"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}]}}},
     "$.properties.x: keyword 'anyOf' is not supported"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]},
     "$: required property 'b' is not in 'properties'"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "no integer lies between"),
    ({"type": "array"}, "needs 'items'"),
    ({"type": "object", "additionalProperties": {"type": "string"}},
     "$.additionalProperties: only true or false"),
    ({"type": "tuple"}, 'type "tuple" is not supported'),
])
def test_unsupported_schemas_are_refused_with_one_line(spec, needle):
    with pytest.raises(ValueError) as e:
        C.json_schema(spec)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("json_schema at $") and needle in msg, msg


def test_bad_regexes_and_choices_are_refused():
    with pytest.raises(ValueError, match=r"regex '\(a' cannot be used.*missing \)"):
        C.regex("(a")
    with pytest.raises(ValueError, match="no text matches it"):
        C.regex(r"a[^\x00-\x{10FFFF}]")
    with pytest.raises(ValueError, match="option 1 must be a non-empty string"):
        C.choice(["a", ""])
    with pytest.raises(ValueError, match="non-empty list"):
        C.choice([])


def test_constraints_are_hashable_specs_and_validate_texts():
    a, b = C.choice(["yes", "no"]), C.choice(["yes", "no"])
    assert a == b and hash(a) == hash(b) and len({a, b, C.regex("yes|no")}) == 2
    assert a.validate("yes") and not a.validate("yes ")
    r = C.regex(r"\d{3}-[a-z]+")
    assert r.validate("123-abc") and not r.validate("12-abc")
    s = C.json_schema('{"type": "object", "properties": {"n": {"type": "number", "maximum": 1}}}')
    assert s.validate('{ "n" : 0.5 }') and not s.validate('{"n": 2}') and not s.validate("{")


def test_byte_automaton_keeps_what_outlines_core_0_2_14_index_drops():
    """Its token index drops a token that ends where a shorter prefix matched: `(ab)+` with
    one-letter tokens could never continue after "ab". Our automaton keeps it."""
    c = C.regex("(ab)+")
    assert _dfa_accepts(c, "abab") and _dfa_accepts(c, "ab") and not _dfa_accepts(c, "aba")


# ----------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return train_tokenizer(TEXT * 20, tmp_path_factory.mktemp("sp"), vocab_size=340)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A Hugging Face byte-level BPE tokenizer dir (GPT-2 style), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False}))
    return load_tokenizer(path)


@pytest.mark.parametrize("kind", ["sp", "bpe"])
def test_token_bytes_are_what_the_tokenizer_decodes(kind, sp_tokenizer, bpe_tokenizer):
    tok = sp_tokenizer if kind == "sp" else bpe_tokenizer
    table = automaton.token_table(tok)
    rng = random.Random(1)
    normal = [i for i, p in enumerate(table.pieces) if p]
    assert len(normal) > 0.9 * tok.vocab_size
    assert all(table.pieces[i] is None for i in tok.eos_ids)
    for text in TEXT + ["naïve café 日本 {}[]\"\\", "a  b\tc\n"]:
        ids = tok.encode(text)
        got = b"".join(table.pieces[i] for i in ids).decode()
        # sentencepiece writes a leading space for the first word; its decode drops it.
        assert got == text or (kind == "sp" and got == " " + text), (got, text)
    whole = [i for i in normal if _utf8(table.pieces[i])]  # byte pieces: checked above
    for _ in range(200):
        ids = rng.sample(whole, 6)
        got = b"".join(table.pieces[i] for i in ids).decode("utf-8", "replace")
        want = tok.decode(ids)
        assert got == want or (kind == "sp" and got.startswith(" ") and got[1:] == want)


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def _brute_masks(compiled):
    """For every DFA state, the tokens whose bytes walk it to a live state."""
    delta, pieces = compiled.delta_QY, compiled.table.pieces
    out = np.zeros((len(delta), len(pieces)), bool)
    for q in range(len(delta)):
        for t, p in enumerate(pieces):
            s = q
            for b in p or b"":
                s = delta[s, b]
                if s < 0:
                    break
            out[q, t] = bool(p) and s >= 0
    return out


@pytest.mark.parametrize("short", [16, 2])
@pytest.mark.parametrize("make", [
    lambda: C.regex(r"(yes|no)( [a-z]{1,12})?"),
    lambda: C.choice(["fairness", "care", "respect and care"]),
    lambda: C.json_schema({"type": "object", "properties": {
        "answer": {"enum": ["yes", "no"]}, "why": {"type": "string", "maxLength": 12},
        "n": {"type": "integer", "minimum": -3, "maximum": 40}},
        "required": ["answer", "why"]}),
])
def test_masks_equal_a_walk_of_every_token_from_every_state(make, short, sp_tokenizer,
                                                           bpe_tokenizer, monkeypatch):
    # short=2 sends most tokens through the separate long-token walk.
    monkeypatch.setattr(automaton, "SHORT", short)
    for tok in (sp_tokenizer, bpe_tokenizer):
        automaton._COMPILED.pop(tok, None)  # compile afresh under this SHORT
        compiled = C.compile_constraint(make(), tok)
        bits = np.unpackbits(compiled.masks_MW.view(np.uint8), axis=1, bitorder="little")
        got = bits[compiled.mask_id_Q][:, :tok.vocab_size].astype(bool)
        np.testing.assert_array_equal(got, _brute_masks(compiled))


def test_compilation_is_cached_per_tokenizer_and_constraint(sp_tokenizer, bpe_tokenizer):
    c = C.regex("[a-z]+")
    a = C.compile_constraint(c, sp_tokenizer)
    assert C.compile_constraint(C.regex("[a-z]+"), sp_tokenizer) is a
    assert C.compile_constraint(c, bpe_tokenizer) is not a
    ids = sp_tokenizer.encode("care")
    assert a.accepts(ids) and a.decode(ids).strip() == "care"
