"""The aligner's text format: `[INPUT] x [INIT] y [ALIGNED] y' [DONE]`, the four markers as
special tokens.

The prompt is `[INPUT] x [INIT] y [ALIGNED]` (BOS first when the tokenizer has one): [INPUT]
opens the question x, [INIT] the initial response y, [ALIGNED] the aligned one. The completion is
y' followed by the [DONE] marker, with no EOS, so the loss (`losses.aligner`) covers exactly y'
and [DONE]. `losses.aligner.add_marker_tokens` prepares a base model's vocabulary.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

INPUT, INIT, ALIGNED, DONE = "[INPUT]", "[INIT]", "[ALIGNED]", "[DONE]"
MARKERS = (INPUT, INIT, ALIGNED, DONE)


def prompt_text(x: str, y: str) -> str:
    """The aligner's prompt: `[INPUT] x [INIT] y [ALIGNED]`."""
    return f"{INPUT} {x} {INIT} {y} {ALIGNED}"


def marker_ids(tokenizer) -> dict[str, int]:
    """The ids of the markers; a clear error when the tokenizer lacks them."""
    out = {}
    for m in MARKERS:
        try:
            ids = tokenizer.encode(m)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure means "not prepared"
            raise ValueError(f"tokenizer {tokenizer.path} cannot encode {m}: {e}") from e
        if len(ids) != 1:
            raise ValueError(f"tokenizer {tokenizer.path} has no single token for {m}; prepare "
                             f"the base model with losses.aligner.add_marker_tokens")
        out[m] = ids[0]
    return out


def prompt_ids(tokenizer, x: str, y: str) -> list[int]:
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + list(tokenizer.encode(prompt_text(x, y)))


def aligner_example(tokenizer, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, completion ids) of one triple; the completion is y' then [DONE] (no EOS).

    Args:
      tokenizer: a tokenizer with the markers (see add_marker_tokens).
      record: an aligner triple {input, initial_response, aligned_response, ...}.
    Returns:
      int32 arrays; the loss covers the completion only.
    """
    done = marker_ids(tokenizer)[DONE]
    prompt = prompt_ids(tokenizer, record["input"], record["initial_response"])
    completion = list(tokenizer.encode(" " + record["aligned_response"])) + [done]
    return np.asarray(prompt, np.int32), np.asarray(completion, np.int32)
