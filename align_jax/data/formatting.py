"""Records -> token sequences with the model's chat template, cut to fit by an explicit policy.

A formatted example is a prompt (tokens whose targets are not scored) and one or more completions
(scored tokens): one for LM/SFT/KTO, two (chosen, rejected) for preference. Prompt and completion
are tokenised separately and concatenated, so the loss mask is exact whatever the tokenizer merges
at the boundary. A `messages` conversation scores every assistant turn (as TRL's
assistant_only_loss): its completion runs from the first assistant turn to the end of the last,
and `Example.scored` masks the system/user turns and template tokens between them. Whatever
the policy does to an example is counted in a TruncationReport that names the example's file
and line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from align_jax.data.aligner_text import aligner_example
from align_jax.data.sources import DataError, Record, Skipped
from align_jax.tokenizer import encode_prompt

# How a record is tokenised (the example's shape); the schemas and batch layouts that go with
# each are `align_jax.data.formats.DataFormat` records.
KINDS = ("lm", "sft", "preference", "kto", "sami", "aligner")
POLICIES = ("truncate_prompt_left", "truncate_completion", "drop", "error")


class TokenizerLike(Protocol):
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ...

    def apply_chat_template(self, messages: list[dict], *,
                            add_generation_prompt: bool = False) -> str:
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
    """One tokenised example.

    Attributes:
      prompt: int32 tokens whose targets are not scored (may be empty).
      completions: int32 scored tokens, each appended to the prompt: (completion,) for LM/SFT/KTO,
        (chosen, rejected) for preference.
      label: KTO label (1.0 desirable, 0.0 undesirable), else None.
      where: provenance of the record (`file:line`).
      ref_logps: reference-model log-probs of each completion, precomputed once over the
        dataset (DPO's cheap reference mode); pair batches carry them as `ref_logps`.
      scored: float32 1/0 over completions[0], 0 where a token is not scored (the user and
        system turns between the assistant turns of a multi-turn conversation); None: every
        completion token is scored.
    """
    prompt: np.ndarray
    completions: tuple[np.ndarray, ...]
    label: float | None = None
    where: str = ""
    ref_logps: tuple[float, ...] | None = None
    scored: np.ndarray | None = None

    def lengths(self) -> tuple[int, ...]:
        return tuple(len(self.prompt) + len(c) for c in self.completions)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamiExample:
    """One SAMI query: C prompts (constitution_i + query) and C responses (response_j sampled under
    constitution j); sequence (i, j) = prompts[i] + responses[j], scored on the response only."""
    prompts: tuple[np.ndarray, ...]
    responses: tuple[np.ndarray, ...]
    where: str = ""


@dataclasses.dataclass(kw_only=True)
class TruncationReport:
    """Counts what the truncation policy did, naming each example."""
    policy: str
    seq_len: int
    num_examples: int = 0
    cut: list[Skipped] = dataclasses.field(default_factory=list)
    dropped: list[Skipped] = dataclasses.field(default_factory=list)

    @property
    def num_kept(self) -> int:
        return self.num_examples - len(self.dropped)

    def summary(self) -> str:
        lines = [(f"truncation={self.policy} seq_len={self.seq_len}: {self.num_examples} "
                  f"examples, {len(self.cut)} cut, {len(self.dropped)} dropped")]
        lines += [f"  cut {t.where}: {t.reason}" for t in self.cut]
        lines += [f"  dropped {t.where}: {t.reason}" for t in self.dropped]
        return "\n".join(lines)


def _ids(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32).reshape(-1)


def _as_messages(value, *, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _assistant_text(value, *, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    texts = [m["content"] for m in value if m["role"] == "assistant"]
    if not texts:
        raise DataError(f"{where}: field {field!r} has no assistant message")
    return "".join(texts)


def render_prompt(tokenizer: TokenizerLike, prompt, *, chat_template: bool = True) -> np.ndarray:
    """Tokenises a prompt (`align_jax.tokenizer.encode_prompt`) as int32 ids.

    Args:
      tokenizer: a Tokenizer (align_jax.tokenizer contract).
      prompt: a string (one user turn) or a list of {role, content} messages.
      chat_template: False renders a string prompt as plain text with BOS (base models).
    Returns:
      int32 token ids.
    """
    return _ids(encode_prompt(tokenizer, prompt, chat_template=chat_template))


def _completion(tokenizer, text) -> np.ndarray:
    ids = list(tokenizer.encode(text, add_bos=False))
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return _ids(ids)


def _conversation(messages: list[dict], *, tokenizer, where: str) -> Example:
    """A chat with every assistant turn scored (each turn's content and its EOS), the turns
    between them and their template tokens masked; leading assistant turns (before any other
    turn) are context. One assistant turn gives exactly the prompt + completion path's tokens.

    The text between two scored turns is cut out of the rendered conversation, so the template
    must render each shorter conversation as a prefix of the longer one (a DataError otherwise).
    """
    first = next((k for k, m in enumerate(messages) if m["role"] != "assistant"), 0)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k > first]
    turns = turns or [len(messages) - 1]
    prompt = render_prompt(tokenizer, messages[:turns[0]])
    done = tokenizer.apply_chat_template(messages[:turns[0]], add_generation_prompt=True)
    pieces, scored = [], []
    for n, k in enumerate(turns):
        text = messages[k]["content"]
        pieces.append(_completion(tokenizer, text))
        scored.append(np.ones(len(pieces[-1]), np.float32))
        if n + 1 == len(turns):
            break
        closed = tokenizer.apply_chat_template(messages[:k + 1])
        upto_next = tokenizer.apply_chat_template(messages[:turns[n + 1]],
                                                  add_generation_prompt=True)
        if not (closed.startswith(done + text) and upto_next.startswith(closed)):
            raise DataError(f"{where}: field 'messages': the chat template does not render the "
                            f"conversation up to turn {k} as a prefix of the longer one, so its "
                            "assistant turns cannot be masked exactly")
        between = list(tokenizer.encode(closed[len(done) + len(text):] + upto_next[len(closed):],
                                        add_bos=False))
        if between[:1] == [tokenizer.eos_id]:  # the turn's end marker: the EOS scored above
            between = between[1:]
        pieces.append(_ids(between))
        scored.append(np.zeros(len(between), np.float32))
        done = upto_next
    return Example(prompt=prompt, completions=(np.concatenate(pieces),), where=where,
                   scored=np.concatenate(scored) if len(turns) > 1 else None)


def constitution_text(record: Mapping[str, Any]) -> str:
    """Renders a constitution record (DESIGN.md schema) as a numbered list of its principles."""
    return "\n".join(f"{i + 1}. {p}" for i, p in enumerate(record["principles"]))


def _tokenize(record: Record, *, kind: str, tokenizer, chat_template: bool):
    data, where = record.data, record.where
    if kind == "lm":
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        return Example(prompt=_ids(bos), completions=(_completion(tokenizer, data["text"]),),
                       where=where)
    if kind == "aligner":
        # `[INPUT] x [INIT] y [ALIGNED]` -> y' [DONE]: the loss covers y' and [DONE] only.
        prompt_ids, completion_ids = aligner_example(tokenizer, data)
        return Example(prompt=prompt_ids, completions=(completion_ids,), where=where)
    if kind == "sami":
        if "prompts" in data:
            # Prompts rendered by the SAMI recipe (methods/sami_prompts.py): plain text is
            # encoded as is (base models), chat messages through the chat template.
            if len(data["prompts"]) != len(data["constitutions"]):
                raise DataError(f"{where}: fields 'prompts' and 'constitutions' differ in "
                                "length (sami schema)")
            prompts = tuple(render_prompt(tokenizer, p, chat_template=not isinstance(p, str))
                            for p in data["prompts"])
        else:
            prompts = tuple(
                render_prompt(tokenizer, f"{c}\n\n{data['prompt']}",
                              chat_template=chat_template)
                for c in data["constitutions"])
        # Responses given as token ids are the sampler's own tokens: used exactly as sampled.
        responses = tuple(_ids(r) if not isinstance(r, str) else _completion(tokenizer, r)
                          for r in data["responses"])
        return SamiExample(prompts=prompts, responses=responses, where=where)
    # UltraChat-style rows carry the first user turn as `prompt` beside their `messages`.
    if "messages" in data and "completion" not in data and kind == "sft":
        messages = data["messages"]
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(f"{where}: field 'messages' must end with an assistant turn after at "
                            "least one other turn")
        if chat_template:
            return _conversation(messages, tokenizer=tokenizer, where=where)
        # Plain text has no turn markers to mask by: the last assistant turn is the completion.
        prompt, fields = messages[:-1], {"completion": messages[-1]["content"]}
    else:
        prompt = data["prompt"]
        fields = {f: data[f] for f in (("chosen", "rejected") if kind == "preference"
                                       else ("completion",))}
    prompt_ids = render_prompt(tokenizer, prompt, chat_template=chat_template)
    completions = tuple(
        _completion(tokenizer, _assistant_text(v, where=where, field=f)) for f, v in fields.items())
    label = float(data["label"]) if kind == "kto" else None
    return Example(prompt=prompt_ids, completions=completions, label=label, where=where)


def _fit(prompt_len: int, comp_lens: Sequence[int], *, seq_len: int, together: bool,
         policy: str):
    """How to fit: (prompt tokens to keep, completion cap, reason or None if it fits), or
    (None, None, reason) to drop.

    `together` means the prompt and all completions share one row (packed preference pairs);
    otherwise each prompt+completion sequence must fit by itself.
    """
    k = len(comp_lens)

    def cost(p, cs):
        return k * p + sum(cs) if together else p + max(cs)

    need = cost(prompt_len, comp_lens)
    if need <= seq_len:
        return prompt_len, max(comp_lens), None
    if policy == "truncate_prompt_left":
        keep = (seq_len - sum(comp_lens)) // k if together else seq_len - max(comp_lens)
        if keep >= 1:
            return keep, max(comp_lens), f"prompt cut from {prompt_len} to {keep} tokens (left)"
        completion_need = need - k * prompt_len if together else max(comp_lens)
        return None, None, (f"completion needs {completion_need} tokens, leaving no room for "
                            f"the prompt in seq_len {seq_len}")
    if policy == "truncate_completion":
        cap = (seq_len - k * prompt_len) // k if together else seq_len - prompt_len
        if cap >= 1:
            return prompt_len, cap, f"completion cut from {max(comp_lens)} to {cap} tokens"
        return None, None, f"prompt alone needs {prompt_len} tokens of seq_len {seq_len}"
    return None, None, f"needs {need} tokens > seq_len {seq_len}"


def truncate(example, *, seq_len: int, policy: str, together: bool = False,
             report: TruncationReport | None = None, lm: bool = False):
    """Applies a truncation policy to one example.

    Args:
      example: an Example or SamiExample.
      seq_len: the row length T.
      policy: one of POLICIES; "error" raises a DataError naming the example.
      together: the example's sequences share one row (packed preference).
      report: where cuts and drops are counted.
      lm: raw text, where both truncate_* policies cut the text on the right.
    Returns:
      The example, cut to fit, or None when dropped.
    """
    if policy not in POLICIES:
        raise ValueError(f"truncation must be one of {POLICIES}, got {policy!r}")
    if report is not None:
        report.num_examples += 1
    if isinstance(example, SamiExample):
        prompt_len = max(len(p) for p in example.prompts)
        comp_lens = [len(r) for r in example.responses]
    else:
        prompt_len, comp_lens = len(example.prompt), [len(c) for c in example.completions]
    if lm and policy.startswith("truncate_"):
        policy = "truncate_completion"
    keep, cap, reason = _fit(prompt_len, comp_lens, seq_len=seq_len, together=together,
                             policy=policy)
    if reason is None:
        return example
    if keep is None:
        if policy == "error":
            raise DataError(f"{example.where}: example {reason} (truncation='error'; choose "
                            f"another policy or a longer seq_len)")
        if report is not None:
            report.dropped.append(Skipped(where=example.where, reason=reason))
        return None
    if report is not None:
        report.cut.append(Skipped(where=example.where, reason=reason))
    if isinstance(example, SamiExample):
        prompts = tuple(p[max(len(p) - keep, 0):] for p in example.prompts)
        return dataclasses.replace(example, prompts=prompts,
                                   responses=tuple(r[:cap] for r in example.responses))
    return dataclasses.replace(example, prompt=example.prompt[len(example.prompt) - keep:],
                               completions=tuple(c[:cap] for c in example.completions),
                               scored=None if example.scored is None else example.scored[:cap])


def format_records(records: Iterable[Record | Mapping[str, Any]], *, kind: str, tokenizer,
                   seq_len: int, truncation: str = "truncate_prompt_left", packed: bool = False,
                   chat_template: bool = True, on_error: str = "raise"):
    """Tokenises records and applies the truncation policy.

    Args:
      records: Records (or plain dicts, given `where = records[i]`) of the kind's schema.
      kind: one of KINDS.
      tokenizer: a Tokenizer (align_jax.tokenizer contract).
      seq_len: row length T.
      truncation: one of POLICIES.
      packed: preference pairs will be packed (chosen and rejected share one row).
      chat_template: False renders prompts as plain text (base models).
      on_error: "raise" or "skip" for records the tokenizer step rejects (bad `messages`).
    Returns:
      (examples, TruncationReport, skipped) where skipped lists (where, reason) of bad records.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    report = TruncationReport(policy=truncation, seq_len=seq_len)
    examples, skipped = [], []
    for i, record in enumerate(records):
        if not isinstance(record, Record):
            record = Record(data=record, where=f"records[{i}]")
        try:
            example = _tokenize(record, kind=kind, tokenizer=tokenizer, chat_template=chat_template)
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append((record.where, str(e).partition(": ")[2]))
            continue
        example = truncate(example, seq_len=seq_len, policy=truncation,
                           together=packed and kind == "preference", report=report, lm=kind == "lm")
        if example is not None:
            examples.append(example)
    return examples, report, skipped
