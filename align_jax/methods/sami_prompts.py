"""SAMI prompts and response filters, after the paper's appendix (A.10 HH-RLHF, A.11 TL;DR).

Three prompt formats:
  "plain"  the paper's plain text for base models (no chat template needed):
               System: Write a response for the assistant that follows the principles in
               the constitution.  (one line)

               Assistant Constitution:
               1. <principle>
               2. <principle>

               Human: <query>

               Assistant:
           and, for sampling only when `example_format` is set, the paper's "Example Format"
           block between the system line and the constitution.
  "summary" the paper's summarization layout for base models (TL;DR), in our own words:
               System: <summarize the post by the constitution>

               Summarization Constitution:
               1. <principle>

               Post: <post>

               Summary:
           sampling prompts end with " The post" and every response starts with it (the
           paper starts each summary so, which keeps a base model on task); with
           `example_format` an example block comes first, as for "plain".
  "chat"   the same instruction and constitution as a system message and the query as the
           user message, rendered by the tokenizer's chat template (instruct models).
The principles of a constitution are shuffled per prompt, independently for each
constitution, by a seeded `random.Random` (never the global random state).

Filters decide which sampled queries are kept: a query is kept only when every one of its
responses passes every filter (the paper drops evasive "I'm sorry" responses).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

FORMATS = ("plain", "summary", "chat")
SYSTEM = "Write a response for the assistant that follows the principles in the constitution."
EXAMPLE_FORMAT = ("Example Format\nAssistant Constitution: [insert constitution here]\n"
                  "Human: [insert query here]\nAssistant: [insert response here]\n\nMain Task")
SUMMARY_SYSTEM = ("Summarize the post below so that the summary follows the principles of the "
                  "constitution.")
SUMMARY_EXAMPLE_FORMAT = ("Example Format\nSummarization Constitution: [insert constitution "
                          "here]\nPost: [insert post here]\nSummary: [insert summary here]\n"
                          "Human: Thank you, this summary follows the principles of the "
                          "constitution.\n\nMain Task")
# What every sampled summary starts with (part of the sampling prompt, then of the response).
RESPONSE_PREFIX = {"summary": "The post"}
# Where a plain-format response ends: the model starts the next turn.
PLAIN_STOPS = ("\nHuman:", "\nSystem:", "\nAssistant Constitution:")
SUMMARY_STOPS = ("\nHuman:", "\nSystem:", "\nSummarization Constitution:", "\nPost:", "###")
EVASIVE_PREFIXES = ("i'm sorry", "i am sorry", "i’m sorry", "i apologize", "i apologise",
                    "sorry,", "as an ai")
TEMPLATE_MARKERS = ("Human:", "Assistant:", "System:", "Assistant Constitution",
                    "Summarization Constitution", "[insert", "<|im_start|>", "<|im_end|>",
                    "[INST]", "[/INST]")


def shuffled_principles(principles: Sequence[str], rng: random.Random) -> list[str]:
    """A fresh permutation of one constitution's principles drawn from `rng`."""
    order = list(principles)
    rng.shuffle(order)
    return order


def numbered(principles: Sequence[str]) -> str:
    return "\n".join(f"{i + 1}. {p}" for i, p in enumerate(principles))


def plain_prompt(principles: Sequence[str], query: str, *, system: str = SYSTEM,
                 example_format: bool = False) -> str:
    """The paper's plain-text prompt, ending with the open assistant turn ("Assistant:")."""
    head = f"System: {system}\n\n"
    if example_format:
        head += EXAMPLE_FORMAT + "\n"
    return (f"{head}Assistant Constitution:\n{numbered(principles)}\n\n"
            f"Human: {query}\n\nAssistant:")


def summary_prompt(principles: Sequence[str], post: str, *, system: str = SUMMARY_SYSTEM,
                   example_format: bool = False) -> str:
    """The summarization prompt (base models), ending with "Summary:"."""
    head = f"System: {system}\n\n"
    if example_format:
        head += SUMMARY_EXAMPLE_FORMAT + "\n"
    return (f"{head}Summarization Constitution:\n{numbered(principles)}\n\n"
            f"Post: {post}\n\nSummary:")


def chat_prompt(principles: Sequence[str], query: str, *, system: str = SYSTEM) -> list[dict]:
    """The chat-format prompt: instruction and constitution as the system turn."""
    return [{"role": "system",
             "content": f"{system}\n\nAssistant Constitution:\n{numbered(principles)}"},
            {"role": "user", "content": query}]


def _check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"sami: prompt_format {fmt!r} is not one of {FORMATS}")


def sami_prompt(principles: Sequence[str], query: str, *, fmt: str, rng: random.Random | None,
                system: str | None = None, example_format: bool = False):
    """The prompt of (constitution, query) in format `fmt`, principles shuffled by `rng`
    (kept in order when rng is None): a string ("plain", "summary") or chat messages
    ("chat"). `system` defaults to the format's instruction."""
    _check(fmt)
    if example_format and fmt == "chat":
        raise ValueError("sami: example_format is for the plain-text formats ('plain', "
                         "'summary'); an instruct model's chat template needs none")
    ps = shuffled_principles(principles, rng) if rng is not None else list(principles)
    if fmt == "plain":
        return plain_prompt(ps, query, system=system or SYSTEM, example_format=example_format)
    if fmt == "summary":
        return summary_prompt(ps, query, system=system or SUMMARY_SYSTEM,
                              example_format=example_format)
    return chat_prompt(ps, query, system=system or SYSTEM)


def response_prefix(fmt: str) -> str:
    """What a format's sampled responses start with ("" for most; "The post" for summaries)."""
    _check(fmt)
    return RESPONSE_PREFIX.get(fmt, "")


def stop_strings(fmt: str) -> tuple[str, ...]:
    """Stop strings of a format: the next turn's marker for plain text, none for chat (the
    template's end-of-turn token stops it)."""
    _check(fmt)
    return {"plain": PLAIN_STOPS, "summary": SUMMARY_STOPS}.get(fmt, ())


def _evasive(texts: Sequence[str]) -> bool:
    return any(t.strip().lower().startswith(EVASIVE_PREFIXES) for t in texts)


def _template(texts: Sequence[str]) -> bool:
    return any(m in t for t in texts for m in TEMPLATE_MARKERS)


def _empty(texts: Sequence[str]) -> bool:
    return any(not t.strip() for t in texts)


def _identical(texts: Sequence[str]) -> bool:
    stripped = [t.strip() for t in texts]
    return len(set(stripped)) < len(stripped)


# name -> predicate over one query's responses (one per constitution): True drops the query.
FILTERS: Mapping[str, Callable[[Sequence[str]], bool]] = {
    "evasive": _evasive, "template": _template, "empty": _empty, "identical": _identical}
DEFAULT_FILTERS = ("empty", "evasive", "template", "identical")


def drop_reason(texts: Sequence[str], filters: Sequence[str] = DEFAULT_FILTERS) -> str | None:
    """The first filter (in `filters` order) that drops a query with these responses, or None
    when every response passes every filter."""
    for name in filters:
        if name not in FILTERS:
            raise ValueError(f"sami: unknown response filter {name!r}; known: {sorted(FILTERS)}")
        if FILTERS[name](texts):
            return name
    return None


def apply_filters(records: Sequence[dict], filters: Sequence[str] = DEFAULT_FILTERS
                  ) -> tuple[list[dict], dict[str, int]]:
    """(kept records, dropped query count by reason) for SAMI records with "texts"."""
    kept, dropped = [], {name: 0 for name in filters}
    for rec in records:
        reason = drop_reason(rec["texts"], filters)
        if reason is None:
            kept.append(rec)
        else:
            dropped[reason] += 1
    return kept, dropped
