"""Tokenizer: training, both backends (HF dir, sentencepiece .model), parity with transformers."""

import json
import os
import random
import re
import shutil

import pytest
import sentencepiece as spm

from align_jax import tokenizer as tk
from align_jax.tokenizer_training import train_tokenizer

# A small corpus in our own words; a few KB is what the demo trains on.
CORPUS = [
    """Our shared commitments

Every person who works with us deserves respect, whatever their role or background.
We tell the truth, even when it is inconvenient, and we correct our mistakes in the open.
Safety comes before speed: anyone may stop work that looks dangerous, and nobody is blamed for it.
We protect the private information that people trust us with and share it only when they agree.
Decisions that affect a team are explained to that team; questions are welcome at every level.
""",
    """Fair treatment means equal pay for equal work, honest feedback, and room to grow.
Conflicts of interest are declared early. Gifts worth more than 50 euros are refused politely.
When we disagree, we argue about ideas rather than people, and we listen before we answer.
Reports of harassment are handled within 10 working days, in confidence, without retaliation.
""" * 3,
    "Numbers such as 2024, 3.14 and 1000000 appear now and then, as do tabs\tand  double spaces.",
]

MESSAGES = [
    {"role": "system", "content": "Answer briefly and honestly."},
    {"role": "user", "content": "What should I do if I see a hazard?"},
    {"role": "assistant", "content": "Stop the work and report it at once."},
    {"role": "user", "content": "Will I be blamed?"},
]

SAMPLES = [
    "We tell the truth.",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\ttabbed",
    "Ünïcödé façade, naïve café",
    "日本語のテキストと 🙂👍 emoji",
    "digits 0123456789 and symbols !@#$%^&*()_+{}[]|\\:;\"'<>,.?/~`",
    "<|user|>\nHi\n<|assistant|>\nHello",
    "",
]

# Random strings drawn from pieces that stress both tokenizers: specials and role markers inside
# text, runs of spaces, newlines, characters outside the corpus, literal byte-piece names.
FUZZ_ATOMS = (list("abcdefghijklmnopqrstuvwxyz ABCXYZ.,;:!?-\n\t0123456789")
              + ["  ", "   ", "é", "ß", "日", "🙂", "Ω", "<", ">", "|", "respect", "truth", " we",
                 "<s>", "</s>", "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>",
                 "<0x41>"])


def _fuzz_strings(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_ATOMS) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(f"tok_{request.param}")
    tok = train_tokenizer(iter(CORPUS), out_dir, vocab_size=400, model_type=request.param)
    return request.param, str(out_dir), tok


def test_train_writes_hf_dir_with_fixed_special_ids(trained):
    model_type, out_dir, tok = trained
    files = set(os.listdir(out_dir))
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= files
    config = json.load(open(os.path.join(out_dir, "tokenizer_config.json")))
    assert config["chat_template"] == tk.DEFAULT_CHAT_TEMPLATE
    specials = (config["bos_token"], config["eos_token"], config["pad_token"])
    assert specials == ("<s>", "</s>", "<pad>")
    for t in (tok, tk.load_tokenizer(os.path.join(out_dir, "tokenizer.model"))):
        assert (t.pad_id, t.bos_id, t.eos_id) == (tk.PAD_ID, tk.BOS_ID, tk.EOS_ID) == (0, 2, 3)
        assert t.eos_ids == (3,)
        assert t.piece_to_id("<unk>") == tk.UNK_ID
        assert [t.piece_to_id(r) for r in tk.ROLE_TOKENS] == [4, 5, 6]
        assert t.id_to_piece(7) == "<0x00>" and t.id_to_piece(7 + 255) == "<0xFF>"
        assert 300 < t.vocab_size <= 400
    # The trained vocabulary learned corpus words: a frequent word takes fewer tokens than bytes.
    assert len(tok.encode("respect")) < len("respect")


@pytest.mark.parametrize("backend", ["hf", "sentencepiece"])
def test_round_trip_ascii_and_non_ascii(trained, backend):
    _, out_dir, tok = trained
    if backend == "sentencepiece":
        tok = tk.load_tokenizer(os.path.join(out_dir, "tokenizer.model"))
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, text
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    # Characters never seen in training are spelled with byte-fallback pieces, never <unk>.
    ids = tok.encode("🙂")
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert tk.UNK_ID not in tok.encode("".join(SAMPLES))


def test_backends_agree_with_each_other_and_with_sentencepiece(trained):
    model_type, out_dir, hf_tok = trained
    sp_tok = tk.load_tokenizer(os.path.join(out_dir, "tokenizer.model"))
    raw = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
    specials = ("<s>", "</s>", "<pad>", "<unk>")
    texts = SAMPLES + CORPUS + _fuzz_strings(400, seed=0)
    for text in texts:
        if model_type == "unigram" and "<0x" in text:
            continue  # documented limitation: unigram may read literal "<0x41>" as a byte piece
        ids = hf_tok.encode(text)
        assert sp_tok.encode(text) == ids, text
        if not any(s in text for s in specials):
            # The raw sentencepiece library is the reference when no special-token string occurs.
            assert raw.encode(text) == ids, text
        for skip in (True, False):
            assert hf_tok.decode(ids, skip_special_tokens=skip) == sp_tok.decode(
                ids, skip_special_tokens=skip), (text, skip)
        assert hf_tok.decode(ids, skip_special_tokens=False) == text


def test_autotokenizer_loads_dir_and_matches(trained):
    from transformers import AutoTokenizer

    model_type, out_dir, tok = trained
    # Compared with the sentencepiece backend, which shares no code with transformers.
    sp_tok = tk.load_tokenizer(os.path.join(out_dir, "tokenizer.model"))
    auto = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    assert len(auto) == tok.vocab_size == sp_tok.vocab_size
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (2, 3, 0)
    for text in SAMPLES + _fuzz_strings(100, seed=1):
        if model_type == "unigram" and "<0x" in text:
            continue
        assert auto.encode(text, add_special_tokens=False) == sp_tok.encode(text)
        # Like Llama, a plain transformers call prepends BOS.
        assert auto(text)["input_ids"] == tok.encode(text, add_bos=True)
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert auto.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    rendered = auto.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == sp_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    auto_ids = auto.apply_chat_template(MESSAGES, add_generation_prompt=True)
    auto_ids = auto_ids["input_ids"] if not isinstance(auto_ids, list) else auto_ids
    assert list(auto_ids) == sp_tok.encode(rendered)


@pytest.mark.parametrize("backend", ["hf", "sentencepiece"])
def test_chat_template_roles_in_order_and_generation_prompt(trained, backend):
    _, out_dir, tok = trained
    if backend == "sentencepiece":
        tok = tk.load_tokenizer(os.path.join(out_dir, "tokenizer.model"))
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text.startswith("<s>") and text.count("<s>") == 1
    positions = [text.index(m["content"]) for m in MESSAGES]
    assert positions == sorted(positions)
    roles = re.findall(r"<\|(\w+)\|>", text)
    assert roles == [m["role"] for m in MESSAGES] + ["assistant"]
    assert text == ("<s><|system|>\nAnswer briefly and honestly.\n"
                    "<|user|>\nWhat should I do if I see a hazard?\n"
                    "<|assistant|>\nStop the work and report it at once.</s>"
                    "<|user|>\nWill I be blamed?\n<|assistant|>\n")
    # The assistant turn is closed by EOS; other turns are not.
    assert text.count("</s>") == 1 and "Stop the work and report it at once.</s>" in text
    plain = tok.apply_chat_template(MESSAGES)
    assert text == plain + "<|assistant|>\n"
    assert tok.apply_chat_template(MESSAGES[:3]).endswith("at once.</s>")
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 1
    assert ids[-2:] == [tok.piece_to_id("<|assistant|>"), tok.encode("\n")[0]]
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_encode_adds_specials_only_when_asked(trained):
    _, out_dir, tok = trained
    body = tok.encode("We listen.")
    assert tok.bos_id not in body and tok.eos_id not in body
    assert tok.encode("We listen.", add_bos=True) == [2] + body
    assert tok.encode("We listen.", add_eos=True) == body + [3]
    # Special-token strings inside text map to their ids in both backends.
    sp_tok = tk.load_tokenizer(os.path.join(out_dir, "tokenizer.model"))
    for t in (tok, sp_tok):
        assert t.encode("<s>We listen.</s>") == [2] + body + [3]
        assert t.decode([2] + body + [3, 0, 0]) == "We listen."
        assert t.decode([2] + body + [3], skip_special_tokens=False) == "<s>We listen.</s>"


def test_raw_model_without_pad_or_bos(tmp_path):
    # A sentencepiece model trained directly, the way many published .model files are.
    path = str(tmp_path / "plain")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter("\n".join(CORPUS).splitlines()), model_prefix=path,
        vocab_size=120, model_type="unigram", bos_id=-1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2, num_threads=1)
    tok = tk.load_tokenizer(tmp_path)  # a dir with only a .model file
    assert tok.path.endswith("plain.model")
    assert tok.bos_id is None and tok.eos_id == 2 and tok.pad_id == 2 and tok.eos_ids == (2,)
    assert tok.encode("We tell the truth.", add_bos=True) == tok.encode("We tell the truth.")
    assert tok.decode(tok.encode("We tell the truth.")) == "We tell the truth."
    text = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True)
    assert text == ("<|system|>\nAnswer briefly and honestly.\n<|user|>\n"
                    "What should I do if I see a hazard?\n<|assistant|>\n")


def test_eos_ids_from_generation_config_and_turn_tokens(tmp_path):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    train_tokenizer(CORPUS, tmp_path / "base", vocab_size=400)
    base = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "base"))
    base.add_special_tokens({"additional_special_tokens": [AddedToken("<|im_end|>", special=True)]})
    end_id = base.convert_tokens_to_ids("<|im_end|>")
    assert end_id == 400
    base.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                          "<|im_end|>\n{% endfor %}")
    out = tmp_path / "chat"
    base.save_pretrained(str(out))
    with open(out / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [3, 5]}, f)
    tok = tk.load_tokenizer(out)
    assert tok.eos_id == 3 and tok.eos_ids == (3, 5, end_id)
    assert tok.vocab_size == 401
    assert tok.apply_chat_template(MESSAGES[1:2]) == (
        "user: What should I do if I see a hazard?<|im_end|>\n")
    assert tok.encode("hi<|im_end|>")[-1] == end_id


def test_chat_template_override_and_missing_template(trained, tmp_path):
    _, out_dir, _ = trained
    override = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    for path in (out_dir, os.path.join(out_dir, "tokenizer.model")):
        tok = tk.load_tokenizer(path, chat_template=override)
        assert tok.apply_chat_template(MESSAGES[1:3]) == (
            "[user] What should I do if I see a hazard?\n[assistant] Stop the work and report it "
            "at once.\n")
    # A template given to train_tokenizer is stored and also used for its tokenizer.model.
    custom = tmp_path / "custom"
    train_tokenizer(CORPUS, custom, vocab_size=400, chat_template=override)
    for path in (custom, custom / "tokenizer.model"):
        assert tk.load_tokenizer(path).apply_chat_template(MESSAGES[3:]) == (
            "[user] Will I be blamed?\n")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(out_dir, "tokenizer.json"), bare / "tokenizer.json")
    tok = tk.load_tokenizer(bare)  # tokenizer.json alone is still a complete tokenizer
    text = "We tell the truth."
    assert tok.encode(text) == tk.load_tokenizer(out_dir).encode(text)
    with pytest.raises(ValueError, match=r"bare has no chat_template"):
        tok.apply_chat_template(MESSAGES)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tk.load_tokenizer(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*empty.*tokenizer\.json"):
        tk.load_tokenizer(empty)
    with pytest.raises(ValueError, match=r"notes\.txt.*sentencepiece"):
        tk.load_tokenizer(empty / "notes.txt")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01 definitely not a protobuf")
    with pytest.raises(ValueError, match=r"garbage\.model.*sentencepiece"):
        tk.load_tokenizer(garbage)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken"):
        tk.load_tokenizer(broken)


def test_bad_messages_name_index_and_field(trained):
    _, _, tok = trained
    good = {"role": "user", "content": "hi"}
    cases = [
        ([good, {"role": "bot", "content": "x"}], ValueError, r"messages\[1\]\['role'\].*'bot'"),
        ([good, good, {"role": "user", "content": 7}], TypeError,
         r"messages\[2\]\['content'\].*int"),
        ([{"content": "x"}], ValueError, r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], ValueError, r"messages\[0\] has no 'content'"),
        ([good, "hello"], TypeError, r"messages\[1\] must be a dict"),
        ("hello", TypeError, "list"),
        ([], ValueError, "empty"),
    ]
    for messages, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            tok.apply_chat_template(messages)


def test_train_errors(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=256 is too small"):
        train_tokenizer(CORPUS, tmp_path, vocab_size=256)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(CORPUS, tmp_path, model_type="wordpiece")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        train_tokenizer(["fine", b"bytes"], tmp_path)
    with pytest.raises(ValueError, match="no non-empty text"):
        train_tokenizer(["", "  \n "], tmp_path)
    with pytest.raises(ValueError, match=r"out of range"):
        tk.load_tokenizer(train_tokenizer(CORPUS, tmp_path, vocab_size=400).path).decode([10**6])
    tok = tk.load_tokenizer(tmp_path)
    with pytest.raises(KeyError, match="not-a-piece"):
        tok.piece_to_id("not-a-piece")


def test_unigram_does_not_read_literal_byte_piece_names(tmp_path):
    # When "<", "0", "x", ">" and the digits all have pieces, the text "<0x41>" must be spelled
    # with them, as sentencepiece does, not matched to the byte piece for "A".
    corpus = CORPUS + ["compare x < 10 and y > 0; 0x41 is hex; <tag> 4 1 x0 <0 >"] * 5
    tok = train_tokenizer(corpus, tmp_path, vocab_size=400, model_type="unigram")
    raw = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in ["<0x41>", "a<0x10>b", "x <0x14> y"]:
        assert tok.encode(text) == raw.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_prompt_tokens_are_a_prefix_of_the_conversation_tokens(trained):
    # SFT masking tokenises the prompt (with the generation prompt) and the whole conversation
    # separately; the default template keeps the first a prefix of the second.
    _, _, tok = trained
    for k in (2, 4):
        prompt = tok.encode(tok.apply_chat_template(MESSAGES[:k], add_generation_prompt=True))
        answer = {"role": "assistant", "content": "Yes, 100% sure; café ok."}
        full = tok.encode(tok.apply_chat_template(MESSAGES[:k] + [answer]))
        assert full[:len(prompt)] == prompt
        assert full[-1] == tok.eos_id
        assert tok.decode(full[len(prompt):]) == answer["content"]


def test_folder_with_custom_code_is_refused_and_its_code_never_runs(trained, tmp_path, monkeypatch):
    # A model folder whose tokenizer_config.json has an auto_map makes transformers ask "Do you
    # wish to run the custom code? [y/N]" on a terminal; a user answering y ran the folder's file.
    _, out_dir, _ = trained
    folder = tmp_path / "model"
    shutil.copytree(out_dir, folder)
    marker = tmp_path / "custom_code_ran"
    (folder / "custom_tok.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class CustomTok(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "CustomTok"
    config["auto_map"] = {"AutoTokenizer": [None, "custom_tok.CustomTok"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(ValueError) as err:
        tk.load_tokenizer(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "custom code" in message, message
    assert not marker.exists()
    assert asked == []
