"""The teacher: whatever turns prompts into completions for synthetic data generation.

The same abstraction is the judge in evaluation and the principle writer in SAMI. SDG
code only ever sees this protocol, so a local model, an OpenAI-compatible endpoint and
the scripted doubles in the tests are interchangeable.

Determinism contract: for the same list of prompts, sampling settings and `seed`, a
teacher returns the same completions. The SDG pipeline relies on it to make a resumed run
equal an uninterrupted one: it always sends the same prompt lists with the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


class TeacherError(RuntimeError):
    """A teacher backend could not produce completions (unreachable, garbage answers, ...)."""


class PartialTeacherError(TeacherError):
    """Some prompts of a call failed after their retries; the others were answered.

    Attributes:
      completions: one entry per prompt, None where that prompt failed.
      failures: prompt index -> one-line reason.
    """

    def __init__(self, message: str, *, completions: list, failures: dict):
        super().__init__(message)
        self.completions, self.failures = completions, failures


@runtime_checkable
class Teacher(Protocol):
    """A text generator driven in batches.

    Attributes:
      context_length: maximum tokens of prompt + completion the teacher accepts.
      applies_constraints: whether the completions of a call with `constraint=` follow it
        (read it after the call: an endpoint that refused structured output turns it off and
        answers free text, which callers then parse tolerantly).
    """

    context_length: int
    applies_constraints: bool

    def complete(self, prompts: list[str], *, temperature: float, top_p: float = 1.0,
                 max_tokens: int, seed: int | None = None,
                 repetition_penalty: float = 1.0, constraint=None) -> list[str]:
        """Continue each raw prompt.

        Args:
          prompts: raw prompt texts (no chat template applied).
          temperature: 0.0 means greedy.
          top_p: nucleus sampling mass.
          max_tokens: most new tokens per completion.
          seed: makes sampling reproducible; None leaves it to the backend.
          repetition_penalty: 1.0 = off; > 1 divides the positive logits (multiplies the
            negative ones) of tokens already in the prompt or completion (HF semantics).
          constraint: None, one `align_jax.generate.constraints.Constraint` for all prompts,
            or one Constraint-or-None per prompt: the completions must match it (when
            `applies_constraints`; a completion cut by max_tokens may still be incomplete).
        Returns:
          One completion per prompt, in order, without the prompt.
        """
        ...

    def chat(self, conversations: list[list[dict]], *, temperature: float, top_p: float = 1.0,
             max_tokens: int, seed: int | None = None,
             repetition_penalty: float = 1.0, constraint=None) -> list[str]:
        """Answer each conversation (a list of {"role", "content"} messages) as the assistant.

        Args and Returns as `complete`.
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens `text` takes in the teacher's own tokenizer."""
        ...


def ask(teacher: Teacher, prompts: list[str], *, use_chat: bool = True, temperature: float,
        top_p: float = 1.0, max_tokens: int, seed: int | None = None,
        repetition_penalty: float = 1.0, constraint=None, owners: Sequence | None = None
        ) -> list[str]:
    """Send prompts as single-turn user messages (`chat`) or raw text (`complete`).

    Args:
      teacher: any `Teacher`.
      prompts: rendered templates.
      use_chat: True for instruction-tuned teachers, False for base models that
        continue a few-shot document.
      temperature, top_p, max_tokens, seed, repetition_penalty, constraint: as
        `Teacher.complete`; a penalty of 1.0 and a constraint of None are not sent, so
        teachers written before they existed keep working.
      owners: for each prompt the work unit (an `align_jax.sdg.store.UnitResult`) it serves.
        When given, prompts that fail after the teacher's retries (`PartialTeacherError`)
        mark their unit failed and come back as "", and the other completions are used;
        without owners the error propagates.
    Returns:
      One completion per prompt; an empty list makes no call.
    """
    if not prompts:
        return []
    kwargs = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    if repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = repetition_penalty
    if constraint is not None:
        kwargs["constraint"] = constraint
    try:
        if use_chat:
            out = teacher.chat([[{"role": "user", "content": p}] for p in prompts], **kwargs)
        else:
            out = teacher.complete(list(prompts), **kwargs)
    except Exception as e:
        completions = getattr(e, "completions", None)
        if (owners is None or not isinstance(e, PartialTeacherError)
                or len(completions) != len(prompts)):
            raise
        for i, text in enumerate(completions):
            if text is None:
                owners[i].fail(e.failures.get(i, str(e)))
        out = ["" if text is None else text for text in completions]
    else:
        completions = out
    for owner, text in zip(owners or (), completions):
        owner.answered += text is not None
    if len(out) != len(prompts):
        raise RuntimeError(
            f"teacher returned {len(out)} completions for {len(prompts)} prompts")
    return [o if isinstance(o, str) else "" for o in out]


# The backends (`local:<HF checkpoint dir>`, `openai:<base URL>`) and
# `make_teacher(spec) -> Teacher` live in align_jax.sdg.backends.
