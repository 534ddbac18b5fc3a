"""Data formats: the data half of a training objective, one `DataFormat` record each.

A format says which records an objective reads (the schema), how one record becomes a tokenised
example (one of `formatting.KINDS`, or its own `tokenize`) and how examples become a batch
(padded, and packed where the layout allows it). `make_loader(kind=...)` takes a format's name
or the record itself, so an objective with a new batch layout brings its own DataFormat and
touches nothing in `loaders.py`, `formatting.py` or `sources.py`.

The objective records (`align_jax.losses.objectives.Objective`) name their format; the data
layer knows nothing of losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from align_jax.data import batching
from align_jax.data.formatting import KINDS

# build(examples, *, batch_size, seq_len, pad_id) -> numpy batch (dict of arrays).
BatchBuilder = Callable[..., dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataFormat:
    """How the records of one objective become batches.

    Attributes:
      name: the format's name, e.g. "sft" (what `make_loader(kind=...)` takes).
      schema: the records' schema: a key of `sources.SCHEMAS`, or the alternatives themselves
        (a tuple of {field: check} dicts, checks as in `sources.SCHEMAS`).
      kind: how a record is tokenised: one of `formatting.KINDS` ("lm": text with BOS,
        "sft"/"kto": prompt + one completion, "preference": prompt + (chosen, rejected),
        "sami": C prompts x C responses).
      build: padded batch builder `build(examples, *, batch_size, seq_len, pad_id) -> batch`.
      build_packed: packed batch builder, same arguments plus `max_pairs` when
        `max_items_per_row` applies; None when the format is padded only.
      pack_length: tokens an example takes in a packed row (first-fit packing); needed with
        `build_packed`.
      max_items_per_row: the packed layout caps items per row at `max_pairs` (pair packing).
      row_mask: padded batches mark their real rows, so a last partial batch may be kept
        (drop_remainder=False); formats without one need drop_remainder=True.
    """
    name: str
    schema: str | tuple[Mapping[str, str], ...]
    kind: str
    build: BatchBuilder
    build_packed: BatchBuilder | None = None
    pack_length: Callable[[Any], int] | None = None
    max_items_per_row: bool = False
    row_mask: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"DataFormat {self.name!r}: kind must be one of {KINDS}, "
                             f"got {self.kind!r}")
        if (self.build_packed is None) != (self.pack_length is None):
            raise ValueError(f"DataFormat {self.name!r}: give build_packed and pack_length "
                             "together")


def _sequence_length(example) -> int:
    return len(example.prompt) + len(example.completions[0])


def _sequences(examples):
    return [batching.sequence(x.prompt, x.completions[0], completion_scored=x.scored)
            for x in examples]


def _pad_sequences(examples, **kw):
    return batching.pad_batch(_sequences(examples), **kw)


def _pack_sequences(examples, **kw):
    return batching.pack_batch(_sequences(examples), **kw)


FORMATS: dict[str, DataFormat] = {}


def register_format(fmt: DataFormat) -> DataFormat:
    """Adds a format under its name (a name already taken must be the same record)."""
    if FORMATS.get(fmt.name, fmt) != fmt:
        raise ValueError(f"data format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(kind: str | DataFormat) -> DataFormat:
    """The DataFormat named `kind` (a DataFormat is returned as is)."""
    if isinstance(kind, DataFormat):
        return kind
    if kind not in FORMATS:
        raise ValueError(f"kind must be one of {tuple(FORMATS)}, got {kind!r}")
    return FORMATS[kind]


# "aligner": triples rendered `[INPUT] x [INIT] y [ALIGNED]` -> `y' [DONE]` (data.aligner_text).
for _name, _schema in (("lm", "text"), ("sft", "sft"), ("aligner", "aligner")):
    register_format(DataFormat(name=_name, schema=_schema, kind=_name, build=_pad_sequences,
                               build_packed=_pack_sequences, pack_length=_sequence_length))
register_format(DataFormat(
    name="preference", schema="preference", kind="preference", build=batching.pad_pair_batch,
    build_packed=batching.pack_pair_batch, pack_length=batching.pair_length,
    max_items_per_row=True, row_mask=False))
register_format(DataFormat(name="kto", schema="kto", kind="kto", build=batching.kto_batch,
                           row_mask=False))
register_format(DataFormat(name="sami", schema="sami", kind="sami", build=batching.sami_batch,
                           row_mask=False))
