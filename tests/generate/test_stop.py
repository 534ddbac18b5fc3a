"""Stop strings: found across token boundaries on the host, cut exactly."""

import jax
import pytest

from align_jax.generate import generate, generate_stream, stop
from align_jax.models import transformer
from align_jax.models.config import ModelConfig

V = 64


class PieceTokenizer:
    """Test-only tokenizer: id i decodes to a fixed piece of 1-3 letters; id 1 is EOS."""

    eos_ids = (1,)

    @staticmethod
    def piece(i: int) -> str:
        return chr(ord("a") + i % 26) * (1 + i // 26)

    def decode(self, ids, *, skip_special_tokens=True):
        return "".join(self.piece(i) for i in ids if not (skip_special_tokens and i == 1))


CONFIG = ModelConfig(vocab_size=V, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, max_position=128, init_std=0.3, eos_token_id=None)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [30]]
SAMPLE = dict(temperature=1.0, seed=11, max_new_tokens=24)


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CONFIG, jax.random.key(0))


def _shortest_prefix(tokens, decode, s):
    for n in range(1, len(tokens) + 1):
        if s in decode(tokens[:n]):
            return n
    return None


def _spanning_stop(tokens, decode, j):
    """A 2-character string made of the last character of token j's text and the first of
    token j+1's, so it spans the boundary."""
    head, tail = decode(tokens[:j + 1]), decode(tokens[:j + 2])
    return head[-1] + tail[len(head)]


def test_cut_at_stop_unit():
    tok = PieceTokenizer()
    ids = [0, 27, 2, 3]  # "a" "bb" "c" "d" -> "abbcd"
    assert stop.cut_at_stop(ids, tok.decode, ["bc"]) == (3, "ab")
    assert stop.cut_at_stop(ids, tok.decode, ["cd", "bb"]) == (2, "a")
    assert stop.cut_at_stop(ids, tok.decode, ["zz"]) is None
    assert stop.cut_at_stop(ids, tok.decode, ["a"]) == (1, "")


@pytest.mark.parametrize("chunk_size", [3, None])
def test_stop_string_spanning_two_tokens_is_cut_exactly(params, chunk_size):
    tok = PieceTokenizer()
    free = generate(CONFIG, params, PROMPTS, tokenizer=tok, **SAMPLE)
    assert free.texts == [tok.decode(t) for t in free.tokens]
    stops = [_spanning_stop(free.tokens[i], tok.decode, j) for i, j in ((0, 6), (1, 12))]
    out = generate(CONFIG, params, PROMPTS, tokenizer=tok, stop_strings=stops,
                   chunk_size=chunk_size, **SAMPLE)
    for i in range(len(PROMPTS)):
        full = free.texts[i]
        hits = [full.find(s) for s in stops if s in full]
        if not hits:
            assert out.tokens[i] == free.tokens[i] and out.finish_reasons[i] == "length"
            continue
        first = min(hits)
        n = min(_shortest_prefix(free.tokens[i], tok.decode, s) for s in stops if s in full)
        assert out.texts[i] == full[:first], i
        assert out.tokens[i] == free.tokens[i][:n], i
        assert out.logprobs[i] == pytest.approx(free.logprobs[i][:n], abs=1e-5)
        assert out.finish_reasons[i] == "stop"
    assert out.finish_reasons[0] == "stop" and len(out.tokens[0]) <= 8
    # The match really spans tokens: neither the last token nor the prefix before it holds it.
    assert stops[0] not in tok.decode(out.tokens[0][-1:])
    assert stops[0] not in tok.decode(out.tokens[0][:-1])


def test_stop_token_is_in_tokens_not_in_text(params):
    tok = PieceTokenizer()
    free = generate(CONFIG, params, PROMPTS, tokenizer=tok, **SAMPLE)
    stop_id = free.tokens[2][4]
    out = generate(CONFIG, params, PROMPTS, tokenizer=tok, stop_token_ids=[stop_id], **SAMPLE)
    cut = free.tokens[2].index(stop_id) + 1
    assert out.tokens[2] == free.tokens[2][:cut]
    assert out.texts[2] == tok.decode(free.tokens[2][:cut - 1])


def test_stream_with_stop_strings_matches_generate(params):
    tok = PieceTokenizer()
    free = generate(CONFIG, params, PROMPTS, tokenizer=tok, **SAMPLE)
    stops = [_spanning_stop(free.tokens[1], tok.decode, 3)]
    out = generate(CONFIG, params, PROMPTS, tokenizer=tok, stop_strings=stops, **SAMPLE)
    streamed = {c.index: c for c in generate_stream(CONFIG, params, PROMPTS, tokenizer=tok,
                                                     stop_strings=stops, chunk_size=2, **SAMPLE)}
    assert [streamed[i].text for i in range(3)] == out.texts
    assert [streamed[i].finish_reason for i in range(3)] == out.finish_reasons


def test_stop_strings_need_a_tokenizer(params):
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(CONFIG, params, PROMPTS, stop_strings=["ab"], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"stop_strings\[1\]"):
        generate(CONFIG, params, PROMPTS, stop_strings=["ab", ""], tokenizer=PieceTokenizer(),
                 max_new_tokens=4)


def test_stop_strings_with_a_trained_tokenizer(tmp_path):
    tokenizer_mod = pytest.importorskip("align_jax.tokenizer_training")
    texts = ["The quick brown fox jumps over the lazy dog.",
             "An assistant answers questions honestly and kindly.",
             "Pack my box with five dozen liquor jugs!"] * 20
    tok = tokenizer_mod.train_tokenizer(texts, tmp_path, vocab_size=320)
    cfg = ModelConfig(vocab_size=tok.vocab_size, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_position=64, init_std=0.5,
                      eos_token_id=None)
    p = transformer.init_params(cfg, jax.random.key(1))
    prompts = [tok.encode("The quick"), tok.encode("An assistant answers")]
    # A stop string across the boundary of two tokens that decode to whole characters (a
    # random model emits many byte pieces; a seed whose sample has such a boundary is searched).
    for seed in range(20):
        kw = dict(tokenizer=tok, temperature=1.0, seed=seed, max_new_tokens=20, ignore_eos=True)
        toks = generate(cfg, p, prompts, **kw).tokens[0]
        texts = [tok.decode(toks[:n]) for n in range(len(toks) + 1)]
        good = [j for j in range(1, 18)
                if texts[j + 2].startswith(texts[j + 1]) and texts[j + 1].startswith(texts[j])
                and len(texts[j + 2]) > len(texts[j + 1]) > len(texts[j])
                and "\ufffd" not in texts[j + 2][len(texts[j + 1]) - 1:len(texts[j + 1]) + 1]]
        if good:
            break
    j = good[0]
    s = _spanning_stop(toks, tok.decode, j)
    out = generate(cfg, p, prompts, stop_strings=[s], chunk_size=4, **kw)
    full = tok.decode(toks)
    assert out.texts[0] == full[:full.find(s)]
    assert out.tokens[0] == toks[:_shortest_prefix(toks, tok.decode, s)]
    assert out.finish_reasons[0] == "stop"


def test_partial_results_only_grow_and_hold_back_stop_prefixes(params):
    tok = PieceTokenizer()
    free = generate(CONFIG, params, PROMPTS, tokenizer=tok, **SAMPLE)
    stops = [_spanning_stop(free.tokens[1], tok.decode, 5)]
    final = generate(CONFIG, params, PROMPTS, tokenizer=tok, stop_strings=stops, **SAMPLE)
    seen: dict[int, list] = {}
    for c in generate_stream(CONFIG, params, PROMPTS, tokenizer=tok, stop_strings=stops,
                             chunk_size=2, partial=True, **SAMPLE):
        seen.setdefault(c.index, []).append(c)
    for i in range(len(PROMPTS)):
        *partials, last = seen[i]
        assert last.finish_reason == final.finish_reasons[i] and last.text == final.texts[i]
        assert all(p.finish_reason is None for p in partials)
        texts = [p.text for p in partials] + [last.text]
        # Each partial text is a prefix of the next and of the final text: safe to stream.
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
        for p in partials:
            assert last.tokens[:len(p.tokens)] == p.tokens
            assert not any(p.text.endswith(s[:k]) for s in stops for k in range(1, len(s)))
    assert any(len(seen[i]) > 2 for i in seen), "expected several partial reports"
