"""Damaged GGUF files: every load path (load_gguf, read_gguf_config, gguf_to_hf, a .gguf path
or a named model through the resolver, `align-jax convert`) says in one line which file and
what is wrong, and leaves no output that looks complete. (A missing metadata key, an
unsupported architecture or tensor type: test_gguf.py.)"""

import os
import pathlib
import re
import struct
import subprocess
import sys

import gguf
import pytest
from gguf_files import Q, tiny_llama, write_tiny_gguf

from align_jax.models import named
from align_jax.models.gguf import gguf_to_hf, load_gguf, read_gguf_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid tiny llama GGUF (a Q8_0 embedding, the rest F32): its bytes and its reader."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf", tiny_llama(),
                           types={"token_embd.weight": Q.Q8_0})
    data = pathlib.Path(path).read_bytes()
    load_gguf(path)  # the undamaged file loads
    return data, gguf.GGUFReader(path)


def _value_at(reader, key):
    """Byte position of metadata `key`'s value type (u32), then its value."""
    return reader.fields[key].offset + 8 + len(key.encode())


def _tensor_at(reader, index):
    """Byte positions of tensor `index`'s dims, type and data offset in its info."""
    t = reader.tensors[index]
    dims = t.field.offset + 8 + len(t.name.encode()) + 4
    kind = dims + 8 * len(t.shape)
    return dims, kind, kind + 4


def _put(data, at, fmt, value):
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, at, value)
    return bytes(out)


# name -> (damage(bytes, reader) -> bytes, what the one-line message must say)
DAMAGE = {
    "empty": (lambda d, r: b"", r"empty file \(0 bytes\)"),
    "cut_in_header": (lambda d, r: d[:10], r"truncated in the header: the tensor count at byte "
                                           r"8 needs 8 bytes, but the file ends at byte 10"),
    "cut_in_metadata": (lambda d, r: d[:r.fields["tokenizer.ggml.tokens"].offset + 100],
                        r"truncated in the metadata: .*tokenizer.ggml.tokens"),
    "cut_in_tensor_infos": (lambda d, r: d[:r.tensors[3].field.offset + 5],
                            r"truncated in the tensor infos: .*tensor #3"),
    "cut_at_data_start": (lambda d, r: d[:r.data_offset],
                          r"truncated in the tensor data: tensor 'token_embd.weight' needs "
                          r"bytes \d+ to \d+, but the file ends at byte \d+"),
    "cut_in_tensor_data": (lambda d, r: d[:-1000],
                           r"truncated in the tensor data: tensor 'blk.1.ffn_down.weight' "
                           r"needs bytes \d+ to \d+, but the file ends at byte \d+"),
    "bad_magic": (lambda d, r: b"GGML" + d[4:], r"not a GGUF file \(starts with b'GGML'"),
    "unsupported_version": (lambda d, r: _put(d, 4, "I", 7),
                            r"GGUF version 7 is not supported"),
    "offset_beyond_end": (lambda d, r: _put(d, _tensor_at(r, -1)[2], "Q", 10**12),
                          r"tensor 'blk.1.ffn_norm.weight' data offset 1000000000000 \(byte "
                          r"\d+\) is beyond the end of the file"),
    "type_changed": (lambda d, r: _put(d, _tensor_at(r, 1)[1], "I", int(Q.F16)),
                     r"tensor 'output.weight' starts at data offset \d+, but tensor "
                     r"'output_norm.weight' before it \(shape \[64\], F16\) ends at \d+"),
    "shape_changed": (lambda d, r: _put(d, _tensor_at(r, 2)[0] + 8, "Q", 300),
                      r"tensor 'blk.0.attn_q.weight' starts at data offset \d+, but tensor "
                      r"'output.weight' before it \(shape \[300, 64\], F32\)"),
    "quant_rows_not_whole_blocks": (lambda d, r: _put(d, _tensor_at(r, 0)[0], "Q", 48),
                                    r"tensor 'token_embd.weight' has shape \[263, 48\] of type "
                                    r"Q8_0, whose rows must be a multiple of 32 values"),
    "unknown_tensor_type": (lambda d, r: _put(d, _tensor_at(r, 1)[1], "I", 99),
                            r"tensor 'output_norm.weight' has unknown GGML type id 99"),
    "unknown_value_type": (lambda d, r: _put(d, _value_at(r, "llama.block_count"), "I", 99),
                           r"metadata key 'llama.block_count' has unknown value type 99"),
    "metadata_not_an_integer": (
        lambda d, r: _put(d, _value_at(r, "llama.block_count"), "I", 6),  # u32 read as f32
        r"metadata key 'llama.block_count' is [0-9.e-]+, expected an integer"),
    "metadata_disagrees_with_tensors": (
        lambda d, r: _put(d, _value_at(r, "llama.feed_forward_length") + 4, "I", 96),
        r"tensor 'blk.0.ffn_gate.weight' has shape \(128, 64\), expected \(96, 64\) from the "
        r"metadata"),
}


@pytest.mark.parametrize("variant", sorted(DAMAGE))
def test_each_damage_is_one_line_naming_the_file(good, tmp_path, variant):
    data, reader = good
    damage, why = DAMAGE[variant]
    path = tmp_path / f"{variant}.gguf"
    path.write_bytes(damage(data, reader))
    with pytest.raises(ValueError) as e:
        load_gguf(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert re.search(why, message), message


def test_conversions_of_a_damaged_file_leave_nothing_that_looks_complete(good, tmp_path,
                                                                         monkeypatch):
    data, reader = good
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"bad.gguf: truncated in the tensor data"):
        read_gguf_config(bad)
    with pytest.raises(ValueError, match=r"bad.gguf: truncated in the tensor data"):
        gguf_to_hf(bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    monkeypatch.setenv("ALIGN_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"bad.gguf: truncated in the tensor data"):
        named.resolve_model_path(str(bad))
    # A named model whose packaged file is damaged: the same line, no cache entry.
    pkg = tmp_path / "site" / "damaged_models_pkg"
    pkg.mkdir(parents=True)
    (pkg / "model.gguf").write_bytes(data[:10])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(named.NAMED_MODELS, "damaged", named.NamedModel(
        distribution="damaged-models-pkg", version="1.0", module="damaged_models_pkg",
        file="model.gguf", kind="gguf"))
    with pytest.raises(ValueError, match=r"model.gguf: truncated in the header"):
        named.resolve_model_path("damaged")
    # Only the (empty) parent folders of the cache remain.
    assert all(p.is_dir() and not any(p.iterdir()) for p in (tmp_path / "cache").iterdir())


def test_convert_cli_prints_one_line_without_a_traceback(good, tmp_path):
    data, reader = good
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_put(data, 4, "I", 7))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGN_JAX_")}
    env.update(PYTHONPATH=str(ROOT), ALIGN_JAX_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "align_jax.cli", "convert",
                          f"--gin_param=convert.convert_main.gguf='{bad}'",
                          f"--output_dir={tmp_path / 'hf'}"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert f"{bad}: GGUF version 7 is not supported" in lines[0], out.stderr
    assert lines[1:] == ["(rerun with --traceback for the stack)"]
    assert not (tmp_path / "hf").exists()
