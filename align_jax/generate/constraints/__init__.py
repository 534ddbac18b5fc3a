"""Structured generation: constraints compiled to token automata and enforced on the device.

    c = constraints.json_schema({"type": "object", "properties": {...}, "required": [...]})
    out = generate(config, params, prompts, max_new_tokens=256, tokenizer=tok, constraint=c)
    json.loads(out.texts[0])  # valid unless out.incomplete[0] (the budget ran out first)

spec.py: the tokenizer-independent `Constraint` (regex, choice, json_schema) and its checks;
schema.py: the JSON-schema subset as a regex; automaton.py: regex -> byte DFA (outlines-core)
-> per-tokenizer masks (cached); device.py: the tables on the device and the per-step mask
and state update inside the jitted decode loop.
"""

from collections.abc import Sequence

from align_jax.generate.constraints.automaton import CompiledConstraint, compile_for
from align_jax.generate.constraints.spec import (
    Constraint,
    choice,
    json_object,
    json_schema,
    regex,
)

__all__ = ["CompiledConstraint", "Constraint", "choice", "compile_constraint", "json_object",
           "json_schema", "per_prompt", "regex"]


def compile_constraint(constraint: Constraint, tokenizer) -> CompiledConstraint:
    """The tables of `constraint` for `tokenizer`, cached per (tokenizer object, constraint).

    Args:
      constraint: a `Constraint`.
      tokenizer: an `align_jax.tokenizer.Tokenizer` (byte-level BPE or sentencepiece-style).
    Returns:
      The host-side `CompiledConstraint` (byte DFA, accepting states, packed token masks).
    Raises:
      ValueError when no token sequence of the tokenizer can satisfy the constraint.
    """
    if not isinstance(constraint, Constraint):
        raise TypeError(f"expected a Constraint (constraints.regex/choice/json_schema), got "
                        f"{type(constraint).__name__}")
    return compile_for(constraint, tokenizer)


def per_prompt(constraint, n: int) -> list[Constraint | None] | None:
    """`generate`'s constraint argument as one entry per prompt (None when none is given).

    Args:
      constraint: None, one Constraint, or a sequence of n Constraint-or-None.
      n: number of prompts.
    Returns:
      None, or a list of n Constraint-or-None with at least one Constraint.
    """
    if constraint is None:
        return None
    if isinstance(constraint, Constraint):
        return [constraint] * n
    if isinstance(constraint, (str, bytes)) or not isinstance(constraint, Sequence):
        raise TypeError("constraint must be a Constraint, a list of Constraint-or-None, or None")
    items = list(constraint)
    if len(items) != n:
        raise ValueError(f"constraint has {len(items)} entries for {n} prompts")
    for i, c in enumerate(items):
        if c is not None and not isinstance(c, Constraint):
            raise TypeError(f"constraint[{i}] must be a Constraint or None, got "
                            f"{type(c).__name__}")
    return items if any(c is not None for c in items) else None
