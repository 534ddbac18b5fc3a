"""Training data: record sources, chat-template formatting, batching and grain loaders.

(`align_jax.data.documents`, the document loader and chunker, is imported by its users directly.)
`Loader` and `make_loader` import grain, so they load on first use: SDG and generation, which
only need records and formatting, do not pay for it.
"""

from align_jax.data.batching import (
    FirstFitPacker,
    classification_batch,
    kto_batch,
    pack_batch,
    pack_pair_batch,
    pad_batch,
    pad_pair_batch,
    sami_batch,
    sequence,
)
from align_jax.data.formats import FORMATS, DataFormat, get_format, register_format
from align_jax.data.formatting import (
    POLICIES,
    Example,
    SamiExample,
    TruncationReport,
    constitution_text,
    format_records,
    render_prompt,
    truncate,
)
from align_jax.data.sources import (
    SCHEMAS,
    DataError,
    LoadReport,
    Record,
    load_records,
    read_jsonl,
    read_rows,
    validate_record,
)

__all__ = [
    "FORMATS", "DataFormat", "get_format", "register_format",
    "POLICIES", "SCHEMAS", "DataError", "Example", "FirstFitPacker", "LoadReport", "Loader",
    "Record", "SamiExample", "TruncationReport", "classification_batch", "constitution_text",
    "format_records", "kto_batch", "load_records", "make_loader", "pack_batch",
    "pack_pair_batch", "pad_batch", "pad_pair_batch", "read_jsonl", "read_rows", "render_prompt",
    "sami_batch", "sequence", "truncate", "validate_record",
]


def __getattr__(name):
    if name in ("Loader", "make_loader"):
        # Local: grain (and jax) load only when a loader is made, not for records and batches.
        from align_jax.data import loaders
        return getattr(loaders, name)
    raise AttributeError(f"module 'align_jax.data' has no attribute {name!r}")
