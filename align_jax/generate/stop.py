"""Stop strings, checked on the host between decode chunks.

Why on the host and in chunks: a stop string is a property of the decoded *text*, and a
token sequence that spells it is not enumerable in general (a string can be split across
tokens in many ways, and byte-level tokens can split a character). So the device decodes
`chunk_size` steps inside one `lax.while_loop`; only then does the host read the new tokens of
the unfinished rows, decode them and look for the stop strings, marking rows done. The host
syncs once per chunk, never per token.

A match is cut exactly: the text ends just before the first occurrence of any stop string,
and the tokens end at the shortest prefix whose decoded text contains it (so the tokens
include the token that completed the stop string, the way they include a stop token).
"""

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


def validate_stop_strings(stop_strings: Sequence[str], tokenizer) -> tuple[str, ...]:
    """Checks the stop strings and that a tokenizer is there to decode with."""
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    stops = tuple(stop_strings)
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop_strings[{i}] must be a non-empty string, got {s!r}")
    if stops and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (pass tokenizer=) to decode the text")
    return stops


def first_stop(text: str, stop_strings: Sequence[str], *, start: int = 0) -> int | None:
    """Index in `text` of the earliest occurrence of any stop string at or after `start`."""
    hits = [i for i in (text.find(s, start) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(tokens: Sequence[int], decode: Decode,
                stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """Finds the first stop string in decode(tokens).

    Args:
      tokens: generated token ids.
      decode: ids -> text.
      stop_strings: strings to stop at.
    Returns:
      None when no stop string occurs; else (n, text): n is the length of the shortest token
      prefix whose decoded text contains a stop string, text that prefix's text cut just
      before the stop string.
    """
    if not stop_strings or first_stop(decode(list(tokens)), stop_strings) is None:
        return None
    # Decoded prefixes only grow with n (up to partial characters), so "contains a stop
    # string" is monotone in n: binary search keeps this at O(log n) decodes.
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if first_stop(decode(list(tokens[:mid])), stop_strings) is None:
            lo = mid + 1
        else:
            hi = mid
    text = decode(list(tokens[:lo]))
    return lo, text[:first_stop(text, stop_strings)]
