"""Checks of checkpoint files before they are read: corruption becomes one line naming the file.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON naming each
tensor's dtype, shape and [begin, end) byte offsets into the data that follows. Truncated,
empty, huge-header or bad-offset files are rejected here with what is wrong, instead of the
reader's bare "incomplete metadata".
"""

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

_MAX_HEADER = 100 * 2**20  # the safetensors reader's own limit
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: str) -> dict[str, Any]:
    """Validates a safetensors file's header against its size; returns the header.

    Raises:
      ValueError naming `path` and the problem.
    """
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path}: not a safetensors file ({size} bytes; empty or truncated)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: corrupt safetensors header (claims {n} bytes of "
                             "metadata; the file is damaged or not safetensors)")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file "
                             f"of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_entry(path, name, info, data)
    return header


def _check_entry(path: str, name: str, info: Any, data: int) -> None:
    ok = (isinstance(info, Mapping) and isinstance(info.get("shape"), list)
          and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
          and all(isinstance(x, int) and x >= 0 for x in info["shape"] + info["data_offsets"]))
    if not ok:
        raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}")
    begin, end = info["data_offsets"]
    if not begin <= end <= data:
        raise ValueError(f"{path}: tensor {name!r} has byte offsets [{begin}, {end}) outside "
                         f"the {data} data bytes (truncated or corrupt file)")
    itemsize = _ITEMSIZE.get(info.get("dtype"))
    if itemsize is not None and (end - begin) != math.prod(info["shape"]) * itemsize:
        raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes but its shape "
                         f"{info['shape']} and dtype {info['dtype']} need "
                         f"{math.prod(info['shape']) * itemsize}")


def int_field(hf: Mapping, key: str, source: str, default: Any = None) -> Any:
    """`hf[key]` when it is an integer (or absent: `default`); a wrong type names the field."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source}: {key} must be an integer, found {value!r} "
                         f"({type(value).__name__})")
    return value
