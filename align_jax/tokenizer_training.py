"""Training a small sentencepiece tokenizer and writing it as a Hugging Face tokenizer dir.

Used by from-scratch runs (`tokenizer='train:<file>'`), the demo, notebooks and tests; the
result loads with `align_jax.tokenizer.load_tokenizer` and `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable

import sentencepiece as spm

from align_jax import interrupts
from align_jax.tokenizer import (
    _BOS,
    _EOS,
    _FIXED_IDS,
    _MIN_VOCAB,
    _PAD,
    _UNK,
    BOS_ID,
    DEFAULT_CHAT_TEMPLATE,
    EOS_ID,
    PAD_ID,
    ROLE_TOKENS,
    UNK_ID,
    Tokenizer,
    _read_json,
    load_tokenizer,
)


def _sentences(texts: Iterable[str]) -> list[str]:
    # sentencepiece skips "sentences" longer than max_sentence_length, so whole documents are fed
    # line by line; newlines themselves are covered by byte fallback.
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one str")
    lines = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        lines += [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("train_tokenizer got no non-empty text")
    return lines


def _auto_coverage(lines: list[str], room: int) -> float:
    # The largest character coverage whose kept characters fit in `room` ids; the rarer characters
    # are then written with byte-fallback pieces, which always exist.
    counts: dict[str, int] = {}
    for line in lines:
        for ch in line.replace(" ", "\u2581"):
            counts[ch] = counts.get(ch, 0) + 1
    freqs = sorted(counts.values(), reverse=True)
    if len(freqs) <= room:
        return 1.0
    # sentencepiece accepts no coverage below 0.98.
    return min(max(sum(freqs[:room]) / sum(freqs), 0.98), 1.0)


def _bpe_merges(vocab: dict[str, int], skip: set[str]) -> list[tuple[str, str]]:
    # A sentencepiece BPE model stores only pieces ranked by score (= id order); the equivalent
    # merge list holds, for every piece, each split into two vocabulary pieces, ranked by the
    # merged piece's id and then by the ids of its parts.
    merges = []
    for piece, piece_id in vocab.items():
        if piece in skip:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _to_hf_tokenizer(sp: spm.SentencePieceProcessor, model_type: str):
    """Builds a `tokenizers.Tokenizer` that encodes exactly like `sp` (identity normalisation)."""
    # Heavy: only the Hugging Face export of a trained tokenizer needs them.
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    user = [i for i in range(n) if pieces[i] in ROLE_TOKENS]
    byte = {i for i in range(n) if sp.is_byte(i)}
    if model_type == "bpe":
        vocab = {p: i for i, p in enumerate(pieces)}
        skip = {pieces[i] for i in [*special, *user, *byte]}
        model = models.BPE(vocab=vocab, merges=_bpe_merges(vocab, skip), unk_token=_UNK,
                           byte_fallback=True, fuse_unk=True)
    else:
        # Byte pieces must only appear through byte fallback, never by matching the literal text
        # "<0x41>": a very low score keeps Viterbi off them (sentencepiece excludes them by type).
        # It cannot when the literal contains a character without a piece, since the unknown
        # score derives from the lowest score; such text may then encode differently.
        model = models.Unigram([(p, -1e6 if i in byte else sp.get_score(i))
                                for i, p in enumerate(pieces)], unk_id=UNK_ID, byte_fallback=True)
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True) for i in special])
    # Role markers are ordinary (non-special) tokens, as in sentencepiece: decoding keeps them.
    tok.add_tokens([AddedToken(pieces[i], normalized=False, special=False) for i in user])
    # Plain `tokenizer(text)` in transformers prepends BOS, like Llama; our encode() never does
    # unless asked.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, BOS_ID)])
    return tok


def _train_sentencepiece(lines: list[str], proto: io.BytesIO, *, model_type: str,
                         vocab_size: int, character_coverage: float, split_digits: bool) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type=model_type,
        vocab_size=vocab_size, byte_fallback=True, character_coverage=character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece=_PAD, unk_piece=_UNK, bos_piece=_BOS, eos_piece=_EOS,
        user_defined_symbols=list(ROLE_TOKENS), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=split_digits,
        hard_vocab_limit=False, max_sentence_length=1 << 16, num_threads=1, minloglevel=2)


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 512,
                    model_type: str = "bpe", chat_template: str = DEFAULT_CHAT_TEMPLATE,
                    split_digits: bool = True,
                    character_coverage: float | None = None) -> Tokenizer:
    """Trains a small sentencepiece tokenizer and writes it as a Hugging Face tokenizer dir.

    Ids are fixed: pad 0, unk 1, bos 2, eos 3, then the role markers <|system|>, <|user|>,
    <|assistant|> (single tokens used by DEFAULT_CHAT_TEMPLATE), then 256 byte-fallback pieces, so
    any text encodes. The corpus is read line by line, with no normalisation, no extra-whitespace
    removal and no dummy-prefix space (encode("a b") == pieces "a", "\u2581b").

    out_dir receives tokenizer.model (sentencepiece), tokenizer.json and tokenizer_config.json
    (with chat_template and the special tokens), which `load_tokenizer(out_dir)` and
    `transformers.AutoTokenizer.from_pretrained(out_dir)` both load with identical ids.

    Args:
      texts: an iterable of strings (documents or lines).
      out_dir: output directory (created if missing).
      vocab_size: an upper bound, at least 300 (263 ids are fixed) and enough for the kept
        characters; a small corpus may yield fewer pieces (unigram). Check `.vocab_size`.
      model_type: "bpe" or "unigram".
      chat_template: jinja chat template stored with the tokenizer.
      split_digits: keep numbers as single digits.
      character_coverage: fraction of character occurrences whose characters get their own
        piece (the rest use bytes); None picks the most that leaves room for merges.
    Returns:
      The Tokenizer loaded back from out_dir (the Hugging Face backend).
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small: {_FIXED_IDS} ids are taken by "
                         f"special tokens, role markers and the 256 byte-fallback pieces; "
                         f"use at least {_MIN_VOCAB}")
    lines = _sentences(texts)
    if character_coverage is None:
        # Keep about a third of the free ids for merged pieces.
        character_coverage = _auto_coverage(lines, (vocab_size - _FIXED_IDS) * 2 // 3)
    proto = io.BytesIO()
    try:
        with interrupts.phase("tokenizer"):
            _train_sentencepiece(lines, proto, model_type=model_type, vocab_size=vocab_size,
                                 character_coverage=character_coverage,
                                 split_digits=split_digits)
    except RuntimeError as e:
        interrupts.check()  # a signal inside sentencepiece's C++ arrives as its RuntimeError
        raise ValueError(f"sentencepiece training failed for vocab_size={vocab_size} "
                         f"({model_type}): {e}. Byte fallback needs 263 ids plus one per kept "
                         f"character; raise vocab_size or lower character_coverage.") from e
    model_path = os.path.join(out_dir, "tokenizer.model")
    with open(model_path, "wb") as f:
        f.write(proto.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())

    from transformers import PreTrainedTokenizerFast  # heavy: only the HF export
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_to_hf_tokenizer(sp, model_type), bos_token=_BOS, eos_token=_EOS,
        unk_token=_UNK, pad_token=_PAD, chat_template=chat_template,
        clean_up_tokenization_spaces=False, model_max_length=1 << 30)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where older
    # transformers versions and other tools look for it; the class name is one both transformers
    # 4.x and 5.x resolve to their tokenizers-backed class.
    hf.save_pretrained(out_dir, save_jinja_files=False)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    config = _read_json(config_path)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return load_tokenizer(out_dir)
