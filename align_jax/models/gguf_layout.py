"""The byte layout of a GGUF file, checked before any of it is trusted.

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:     key (u64 length + UTF-8) | value type u32 | value (arrays: item type u32,
                  count u64, items)
    tensor infos: name | n_dims u32 | dims u64 x n_dims (innermost first) | GGML type u32 |
                  offset u64 (from the start of the data section)
    padding to `general.alignment` (default 32), then the tensor data

`check_layout` walks this with bounds checks and applies llama.cpp's own rules (its
gguf_init: every tensor at the offset where the previous one ends, padded to the alignment;
quantized rows a whole number of blocks), so a cut, foreign or damaged file is one ValueError
naming the file and what is wrong, instead of a struct, reshape or memory-map error from
deeper down.
"""

import mmap
import os
import struct

import gguf

# Value type id -> struct format of its fixed-size payload (STRING 8 and ARRAY 9 are variable).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
    """Reads the header with bounds checks; `section` names where a cut file ends."""

    def __init__(self, buf, path: str, order: str):
        self.buf, self.path, self.order = buf, path, order
        self.size = len(buf)
        self.pos = 0
        self.section = "header"

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what}")

    def _need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated in the {self.section}: {what} at byte {self.pos} needs "
                            f"{n} bytes, but the file ends at byte {self.size}")

    def take(self, fmt: str, what: str):
        n = struct.calcsize(self.order + fmt)
        self._need(n, what)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.pos += n

    def string(self, what: str) -> str:
        n = self.take("Q", f"the length of {what}")
        self._need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} at byte {self.pos - n} is not UTF-8 ({e.reason})") from None


def _value(cur: _Cursor, kind: int, key: str):
    """Reads one metadata value; keeps scalars and strings (alignment), skips array payloads."""
    if kind in _SCALARS:
        return cur.take(_SCALARS[kind], f"the value of metadata key {key!r}")
    if kind == _STRING:
        return cur.string(f"the value of metadata key {key!r}")
    if kind == _ARRAY:
        item = cur.take("I", f"the item type of metadata array {key!r}")
        count = cur.take("Q", f"the length of metadata array {key!r}")
        if item in _SCALARS:
            cur.skip(count * struct.calcsize(_SCALARS[item]), f"the {count} items of metadata "
                                                              f"array {key!r}")
        elif item in (_STRING, _ARRAY):
            for i in range(count):
                _value(cur, item, f"{key}[{i}]")
        else:
            raise cur.fail(f"metadata array {key!r} has unknown item type {item} (corrupt "
                           "header)")
        return None
    raise cur.fail(f"metadata key {key!r} has unknown value type {kind} (corrupt header)")


def _tensor_bytes(cur: _Cursor, name: str, dims: list[int], type_id: int) -> int:
    try:
        kind = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown GGML type id {type_id} (corrupt "
                       "header)") from None
    if dims and dims[0] % block:
        raise cur.fail(f"tensor {name!r} has shape {list(reversed(dims))} of type "
                       f"{kind.name}, whose rows must be a multiple of {block} values: its "
                       "shape or type is corrupt")
    count = 1
    for d in dims:
        count *= d
    return count // block * type_size


def check_layout(path: str) -> None:
    """Raises a one-line ValueError naming `path` and the damage when its layout is not a
    whole, consistent GGUF file; returns None for a good one."""
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a GGUF model")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic = bytes(buf[:4])
        if magic != b"GGUF":
            if b"GGUF".startswith(magic):
                raise ValueError(f"{path}: truncated in the header: {size} bytes, the "
                                 "header needs 24")
            raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected "
                             "b'GGUF')")
        order = "<"
        if size >= 8 and struct.unpack_from("<I", buf, 4)[0] & 0xFFFF == 0:
            order = ">"  # a big-endian file, as gguf's reader detects it
        cur = _Cursor(buf, path, order)
        cur.pos = 4
        version = cur.take("I", "the version")
        if version not in (2, 3):
            raise cur.fail(f"GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors = cur.take("Q", "the tensor count")
        n_keys = cur.take("Q", "the metadata count")
        cur.section = "metadata"
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        seen = set()
        for i in range(n_keys):
            key = cur.string(f"metadata key #{i}")
            if key in seen:
                raise cur.fail(f"metadata key {key!r} appears twice (corrupt header)")
            seen.add(key)
            kind = cur.take("I", f"the value type of metadata key {key!r}")
            value = _value(cur, kind, key)
            if key == "general.alignment":
                if kind != 4 or not value or value & (value - 1):
                    raise cur.fail(f"metadata general.alignment={value!r} is not a power of "
                                   "two stored as uint32")
                alignment = value
        cur.section = "tensor infos"
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor #{i}")
            n_dims = cur.take("I", f"the rank of tensor {name!r}")
            if n_dims > _MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS}; "
                               "corrupt header)")
            dims = [cur.take("Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
            type_id = cur.take("I", f"the type of tensor {name!r}")
            offset = cur.take("Q", f"the data offset of tensor {name!r}")
            infos.append((name, dims, type_id, offset))
        start = -(-cur.pos // alignment) * alignment
        expected, previous = 0, "the data section's start"
        for name, dims, type_id, offset in infos:
            n = _tensor_bytes(cur, name, dims, type_id)
            begin, end = start + offset, start + offset + n
            if offset != expected and begin >= size:
                raise cur.fail(f"tensor {name!r} data offset {offset} (byte {begin}) is beyond "
                               f"the end of the file ({size} bytes)")
            if offset != expected:
                raise cur.fail(f"tensor {name!r} starts at data offset {offset}, but "
                               f"{previous} ends at {expected}: a shape or type in the "
                               "header does not match the data (corrupt header)")
            if end > size:  # where a consistent header says the data is: the file is cut
                raise cur.fail(f"truncated in the tensor data: tensor {name!r} needs bytes "
                               f"{begin} to {end}, but the file ends at byte {size}")
            expected += -(-n // alignment) * alignment
            kind = gguf.GGMLQuantizationType(type_id).name
            previous = f"tensor {name!r} before it (shape {list(reversed(dims))}, {kind})"
