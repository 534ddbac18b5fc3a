"""One Tokenizer over Hugging Face tokenizer dirs and raw sentencepiece models, plus chat templates.

`load_tokenizer(path)` reads either a Hugging Face tokenizer directory (tokenizer.json and/or
tokenizer_config.json, loaded through transformers.AutoTokenizer, offline) or a sentencepiece
`.model` file (loaded through sentencepiece itself). Both give the same interface: `encode` never
adds special tokens unless asked, `apply_chat_template` returns text that already carries BOS when
the template wants it (so encode the result with add_bos=False).

Training a small sentencepiece tokenizer in-process (what tests and the from-scratch demo use,
since no tokenizer can be downloaded) is `align_jax.tokenizer_training.train_tokenizer`; it
imports this module, never the other way round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)

# Our default conversation format. Each turn opens with its role marker on its own line; user and
# system turns end with a newline, assistant turns end with EOS so a model trained on this format
# learns to stop there. BOS opens the conversation, so encode the rendered text with add_bos=False.
#   <s><|system|>\n{system}\n<|user|>\n{question}\n<|assistant|>\n{answer}</s><|user|>\n...
DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}"
    "{%- else -%}{{- '\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}")

# Special tokens that some chat formats use to close a turn; a generation loop should stop on them
# as well as on EOS. Only counted when the dir's chat template actually writes them.
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>",
                       "<|endoftext|>")

# Fixed ids of the special pieces in models made by train_tokenizer.
_PAD, _UNK, _BOS, _EOS = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_FIXED_IDS = 4 + 3 + 256  # specials, role markers, byte-fallback pieces
_MIN_VOCAB = 300

_HF_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer:
    """Common interface; built by `load_tokenizer` or `train_tokenizer`, never directly.

    Attributes:
      path: where it was loaded from.
      bos_id, eos_id: int or None. pad_id: the pad token, or eos_id when there is none.
      eos_ids: every id that ends a turn (eos first), for use as generation stop tokens.
      vocab_size: number of ids, added tokens included.
    """

    path: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    eos_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Tokenises text; special-token strings in it (e.g. "<s>") map to their ids.

        Args:
          text: the string.
          add_bos: prepend bos_id (skipped when the tokenizer has no BOS).
          add_eos: append eos_id.
        Returns:
          The token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id is None:
                raise ValueError(f"tokenizer {self.path} has no EOS token; cannot add_eos")
            ids = ids + [self.eos_id]
        return ids

    def encode_input(self, text: str) -> list[int]:
        """Tokenises a raw model input with the tokenizer's own special-token rules.

        What transformers' `tokenizer(text)` gives (add_special_tokens=True): whatever the
        tokenizer's post-processor adds, e.g. BOS for Llama-3 and Gemma, nothing for SmolLM2 and
        Qwen2 (which have no post-processor template). A sentencepiece model prepends BOS when
        it has one, as Llama's sentencepiece tokenizer does.

        Args:
          text: the string.
        Returns:
          The token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._encode_input(text)

    def _encode_input(self, text: str) -> list[int]:
        return self.encode(text, add_bos=True)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Turns ids back into text.

        Args:
          ids: token ids (any int sequence, e.g. a list or a 1-D numpy array).
          skip_special_tokens: drop BOS/EOS/PAD/UNK and other special tokens.
        Returns:
          The text.
        """
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return self._decode(ids, skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = False) -> str:
        """Renders a conversation as text with this tokenizer's chat template.

        Args:
          messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
          add_generation_prompt: end with the opening of an assistant turn.
        Returns:
          The text; encode it with add_bos=False since the template writes BOS itself if needed.
        """
        return self._render(validate_messages(messages), add_generation_prompt)

    def encode_pair(self, text: str, text_pair: str | None = None, *,
                    max_length: int | None = None) -> tuple[list[int], list[int]]:
        """Encoder input for one text or a text pair, with the model's special tokens.

        BERT: [CLS] a [SEP] b [SEP] with token types 0...0 1...1; RoBERTa: <s> a </s></s> b </s>.

        Args:
          text: the first segment.
          text_pair: the optional second segment.
          max_length: truncate (longest segment first) to this many ids, specials included.
        Returns:
          (ids, token_type_ids).
        """
        raise ValueError(f"tokenizer {self.path} has no encoder (CLS/SEP) template; "
                         f"encode_pair needs a Hugging Face BERT-family tokenizer")

    def save(self, path: str | os.PathLike) -> list[str]:
        """Writes this tokenizer's files into the dir `path` (created), so that it loads with
        `load_tokenizer(path)` and transformers' `AutoTokenizer.from_pretrained(path)` alike,
        giving the same ids. Returns the names written."""
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        """Returns the vocabulary string of one id."""
        return self._id_to_piece(self._check_id(int(token_id)))

    def piece_to_id(self, piece: str) -> int:
        """Returns the id of a vocabulary string; KeyError when it is not in the vocabulary."""
        raise NotImplementedError

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range for vocab size "
                             f"{self.vocab_size} ({self.path})")
        return token_id

    def _id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, pad_id={self.pad_id})")


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Checks a chat conversation and returns it as plain dicts.

    Args:
      messages: a list of {"role", "content"} mappings.
    Returns:
      [{"role": str, "content": str}, ...] (extra keys dropped).
    Raises:
      ValueError / TypeError naming the index and field of the first bad message.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, "
                        f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', "
                            f"got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise ValueError(f"messages[{i}] has no {field!r} field (keys: {sorted(message)})")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}]['content'] must be a str, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for i in ids:
        if i is not None:
            seen.setdefault(int(i), None)
    return tuple(seen)


# ----------------------------------------------------------------------------- sentencepiece


def _render_jinja(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                  **special_tokens: str) -> str:
    # Same environment settings as transformers' chat template renderer, so one template string
    # renders identically through either backend.
    import jinja2  # local: only Hugging Face chat templates need jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)


class _SentencePieceTokenizer(Tokenizer):
    """A raw sentencepiece model.

    Its chat template is, in order: the one passed in, the `chat_template` of a
    tokenizer_config.json next to the file (as train_tokenizer writes), DEFAULT_CHAT_TEMPLATE.
    """

    def __init__(self, path: str, *, chat_template: str | None = None):
        self.path = path
        try:
            with open(path, "rb") as f:
                # Imported here: the model, loss and train-step modules (and the GPU
                # benchmark, on a machine without sentencepiece) import this module.
                import sentencepiece as spm  # local: only .model tokenizers need it
                self._sp = spm.SentencePieceProcessor(model_proto=f.read())
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable sentencepiece model ({e})") from e
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
        self.eos_ids = _unique([self.eos_id])
        sibling = _read_json(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        stored = sibling.get("chat_template")
        self.chat_template = (chat_template or (stored if isinstance(stored, str) else None)
                              or DEFAULT_CHAT_TEMPLATE)
        # sentencepiece never matches control or unknown pieces in text, while Hugging Face matches
        # every special token; we split them out ourselves so both backends agree on "<s>" in text.
        self._special = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if sp.is_control(i) or sp.is_unknown(i)}
        names = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None

    def _encode(self, text):
        if self._special_re is None:
            return self._sp.encode(text)
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            if match.start() > start:
                ids += self._sp.encode(text[start:match.start()])
            ids.append(self._special[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def _decode(self, ids, skip_special_tokens):
        special_ids = set(self._special.values())
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in special_ids])
        # sentencepiece drops control pieces when decoding; write them out like Hugging Face does.
        parts, run = [], []
        for i in ids:
            if i in special_ids:
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def _render(self, messages, add_generation_prompt):
        sp = self._sp
        return _render_jinja(
            self.chat_template, messages, add_generation_prompt,
            bos_token=sp.id_to_piece(self.bos_id) if self.bos_id is not None else "",
            eos_token=sp.id_to_piece(self.eos_id) if self.eos_id is not None else "")

    def _id_to_piece(self, token_id):
        return self._sp.id_to_piece(token_id)

    def _dummy_prefix(self) -> bool:
        from sentencepiece import sentencepiece_model_pb2  # local: only .model tokenizers
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        return bool(proto.normalizer_spec.add_dummy_prefix)

    def save(self, path):
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        folder = os.path.dirname(self.path)
        if (os.path.basename(self.path) == "tokenizer.model"
                and os.path.isfile(os.path.join(folder, "tokenizer.json"))):
            return copy_tokenizer_files(folder, path)  # train_tokenizer's dir: HF files too
        names = copy_tokenizer_files(self.path, path)
        sp = self._sp
        piece = lambda i: sp.id_to_piece(i) if i is not None and i >= 0 else None  # noqa: E731
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": self.bos_id is not None,
                  "add_eos_token": False, "bos_token": piece(self.bos_id),
                  "eos_token": piece(self.eos_id), "unk_token": piece(sp.unk_id()),
                  "pad_token": piece(sp.pad_id()), "chat_template": self.chat_template,
                  "legacy": False, "add_prefix_space": self._dummy_prefix(),
                  "clean_up_tokenization_spaces": False}
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1, ensure_ascii=False)
        return sorted({*names, "tokenizer_config.json"})

    def piece_to_id(self, piece):
        token_id = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(token_id) != piece:
            raise KeyError(f"{piece!r} is not in the vocabulary of {self.path}")
        return token_id


# ----------------------------------------------------------------------------- Hugging Face


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(out).__name__}")
    return out


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


class _HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory, through transformers.AutoTokenizer (offline)."""

    def __init__(self, path: str, *, chat_template: str | None = None):
        self.path = path
        self._tok = _load_hf(path)
        tok = self._tok
        gen_eos = _as_id_list(_read_json(os.path.join(path, "generation_config.json"))
                              .get("eos_token_id"))
        self.vocab_size = len(tok)
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else (
            gen_eos[0] if gen_eos else None)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.chat_template = chat_template or tok.chat_template
        if isinstance(self.chat_template, dict):  # named templates: use the default one
            self.chat_template = self.chat_template.get("default")
        turn_ends = []
        if isinstance(self.chat_template, str):
            vocab = tok.get_vocab()
            turn_ends = [vocab[t] for t in _END_OF_TURN_TOKENS
                         if t in self.chat_template and t in vocab]
        self.eos_ids = _unique([self.eos_id, *gen_eos, *turn_ends])
        self._vocab = None

    def _encode(self, text):
        return list(self._tok.encode(text, add_special_tokens=False))

    def _encode_input(self, text):
        # transformers applies the post-processor, which for Llama/Gemma-style classes it has
        # rebuilt from tokenizer_config.json's add_bos_token / add_eos_token.
        return list(self._tok.encode(text, add_special_tokens=True))

    def _decode(self, ids, skip_special_tokens):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_pair(self, text, text_pair=None, *, max_length=None):
        if not isinstance(text, str) or not (text_pair is None or isinstance(text_pair, str)):
            raise TypeError("encode_pair expects str segments")
        out = self._tok(text, text_pair, add_special_tokens=True,
                        truncation="longest_first" if max_length else False,
                        max_length=max_length, return_token_type_ids=True)
        ids = list(out["input_ids"])
        types = list(out.get("token_type_ids") or [0] * len(ids))
        return ids, types

    def save(self, path):
        path = os.fspath(path)
        before = set(os.listdir(path)) if os.path.isdir(path) else set()
        # save_pretrained names the class in tokenizer_config.json: without it AutoTokenizer
        # would pick the class of config.json's model_type, whose special-token rules can
        # differ from the ones this tokenizer was loaded with.
        self._tok.chat_template = self.chat_template
        self._tok.save_pretrained(path)
        for name in ("generation_config.json",):
            src = os.path.join(self.path, name)
            if os.path.isfile(src) and not os.path.exists(os.path.join(path, name)):
                shutil.copy(src, path)
        return sorted(set(os.listdir(path)) - before)

    def _render(self, messages, add_generation_prompt):
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.path} has no chat_template in its "
                             f"tokenizer_config.json; pass load_tokenizer(path, chat_template=...)")
        try:
            text = self._tok.apply_chat_template(
                messages, tokenize=False, chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors raised by the template itself, e.g. on a system role
            raise ValueError(f"chat template of {self.path} rejected the messages: {e}") from e
        if not isinstance(text, str):
            raise TypeError(f"chat template of {self.path} returned {type(text).__name__}")
        return text

    def _id_to_piece(self, token_id):
        return self._tok.convert_ids_to_tokens(token_id)

    def piece_to_id(self, piece):
        if self._vocab is None:
            self._vocab = self._tok.get_vocab()
        if piece not in self._vocab:
            raise KeyError(f"{piece!r} is not in the vocabulary of {self.path}")
        return self._vocab[piece]


_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                "sentencepiece.bpe.model")


def _load_hf(path: str):
    """AutoTokenizer over a dir whose JSON files parse; never a silent fallback that drops
    the configured special tokens or template."""
    # Heavy: only Hugging Face tokenizer dirs need transformers.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        _read_json(os.path.join(path, name))  # a corrupt file is a ValueError naming it
    auto_map = _read_json(os.path.join(path, "tokenizer_config.json")).get("auto_map")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _VOCAB_FILES):
        raise ValueError(f"{path}: has tokenizer_config.json but no vocabulary file (one of "
                         f"{', '.join(_VOCAB_FILES)}); copy the tokenizer's files here")
    has_config = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    try:
        # Never a folder's own Python (auto_map): without trust_remote_code=False transformers
        # asks on a terminal, and a "y" runs whatever file the folder ships.
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        if auto_map:
            config_path = os.path.join(path, "tokenizer_config.json")
            raise ValueError(f"{config_path}: auto_map names custom code "
                             f"({json.dumps(auto_map)}); align_jax never runs a model "
                             f"folder's Python files: use a standard tokenizer_class") from None
        # A bare tokenizer.json (no config naming a class) is still a complete fast tokenizer;
        # with a tokenizer_config.json the fallback would drop its settings, so it is an error.
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if os.path.isfile(tokenizer_json) and not has_config:
            try:
                return PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)
            except Exception:
                pass
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"could not load the Hugging Face tokenizer in {path} as its "
                         f"tokenizer_config.json describes it: {type(e).__name__}: {first}"
                         ) from None


# ----------------------------------------------------------------------------- loading


# What makes a tokenizer dir: copied next to exported weights so the dir is a complete model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files of `src` (a dir, or a .model file) into the dir `dst`.

    Files already in `dst` are kept. Returns the names copied.
    """
    src = os.fspath(src)
    os.makedirs(dst, exist_ok=True)
    if os.path.isfile(src):
        if src.endswith(".model") and not os.path.exists(os.path.join(dst, "tokenizer.model")):
            shutil.copy(src, os.path.join(dst, "tokenizer.model"))
            return ["tokenizer.model"]
        src = os.path.dirname(src)
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path) and not os.path.exists(os.path.join(dst, name)):
            shutil.copy(path, dst)
            copied.append(name)
    return copied


def load_tokenizer(path: str | os.PathLike, *, chat_template: str | None = None) -> Tokenizer:
    """Loads a tokenizer from a Hugging Face tokenizer dir, a sentencepiece `.model` file, a
    named model (align_jax/models/named.py) or a .gguf file.

    A directory with tokenizer.json or tokenizer_config.json loads through transformers (offline);
    a directory with only a `.model` file (tokenizer.model preferred), or a `.model` file itself,
    loads through sentencepiece (chat template: a sibling tokenizer_config.json's, else
    DEFAULT_CHAT_TEMPLATE).

    A named model or a .gguf file resolves to the same cached Hugging Face dir as `load_hf`.

    Args:
      path: the directory, file or model name.
      chat_template: a jinja chat template to use instead of the one stored with the tokenizer.
    Returns:
      A Tokenizer.
    Raises:
      FileNotFoundError when nothing loadable is there; ValueError when a file is unreadable.
    """
    path = os.fspath(path)
    if path.endswith(".gguf") or not os.path.exists(path):
        # A named default or a .gguf file: its cached Hugging Face conversion, as load_hf
        # reads it (the model layer owns the conversion; this layer sits above it).
        from align_jax.models.named import NAMED_MODELS, resolve_model_path
        if path in NAMED_MODELS or (path.endswith(".gguf") and os.path.isfile(path)):
            path = resolve_model_path(path)
    if not os.path.exists(path):
        from align_jax.models.named import NAMED_MODELS
        raise FileNotFoundError(f"tokenizer path {path} does not exist and is not a named model "
                                f"({', '.join(sorted(NAMED_MODELS))})")
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name.endswith(".model"):
            return _SentencePieceTokenizer(path, chat_template=chat_template)
        if name in _HF_FILES:
            return _HFTokenizer(os.path.dirname(path) or ".", chat_template=chat_template)
        raise ValueError(f"{path}: expected a Hugging Face tokenizer directory or a sentencepiece "
                         f".model file")
    if any(os.path.isfile(os.path.join(path, f)) for f in _HF_FILES):
        return _HFTokenizer(path, chat_template=chat_template)
    models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
    if "tokenizer.model" in models:
        models = ["tokenizer.model"]
    if len(models) == 1:
        return _SentencePieceTokenizer(os.path.join(path, models[0]), chat_template=chat_template)
    if models:
        raise ValueError(f"{path} holds several sentencepiece models {models}; pass one file")
    raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json, "
                            f"tokenizer_config.json or a sentencepiece .model file")


def encode_prompt(tokenizer, prompt: str | list[dict], *, chat_template: bool = True) -> list[int]:
    """The one prompt encoder: a prompt -> the token ids a model continues from.

    Args:
      tokenizer: a Tokenizer (or anything with its `encode`, `apply_chat_template`, `bos_id`).
      prompt: a string (one user turn) or a list of {role, content} messages.
      chat_template: True renders the chat template with the assistant turn opened (the
        template writes BOS where the model wants one, so none is added); False encodes the
        raw text (messages joined by blank lines) with the tokenizer's own special-token
        rules (`Tokenizer.encode_input`, as transformers' `tokenizer(text)`).
    Returns:
      The token ids.
    """
    if not chat_template:
        if not isinstance(prompt, str):
            prompt = "\n\n".join(m["content"] for m in prompt)
        encode_input = getattr(tokenizer, "encode_input", None)
        if encode_input is None:  # a minimal tokenizer-like object: BOS is its only special
            return list(tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None))
        return list(encode_input(prompt))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_bos=False))
