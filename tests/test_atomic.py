"""Atomic writers and the file modes of what they (and the exporters) write."""

import os
import stat

import jax
import pytest

from align_jax.atomic import atomic_write, default_mode
from align_jax.models import encoder, lora
from align_jax.models.config import get_config
from align_jax.models.encoder_layers import EncoderConfig
from align_jax.models.hf import save_hf
from align_jax.models.transformer import init_params


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_exports_get_the_modes_of_a_plain_open(tmp_path, umask):
    # Exported model.safetensors files were 0600 (safetensors' temp file) beside 0644 files.
    expected = 0o666 & ~umask
    config = get_config("tiny", vocab_size=64)
    params = init_params(config, jax.random.key(0))
    save_hf(config, params, tmp_path / "hf")
    enc = EncoderConfig(vocab_size=32, embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32,
                        max_positions=16, max_length=16)
    encoder.save_encoder(enc, encoder.init_encoder(enc, jax.random.PRNGKey(0)), tmp_path / "enc")
    adapters = lora.init_lora(config, params, rank=2, alpha=4, targets=("q",),
                              rng=jax.random.key(1))
    lora.save_peft(config, adapters, tmp_path / "adapter")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "adapter_model.safetensors",
                                       "config.json"}
    assert {p.relative_to(tmp_path).as_posix(): oct(_mode(p)) for p in files} == {
        p.relative_to(tmp_path).as_posix(): oct(expected) for p in files}


def test_default_mode_and_atomic_write_follow_the_umask(tmp_path, umask):
    atomic_write(tmp_path / "a.txt", "x")
    private = tmp_path / "b.bin"
    private.write_bytes(b"x")
    os.chmod(private, 0o600)
    default_mode(private)
    assert _mode(tmp_path / "a.txt") == _mode(private) == 0o666 & ~umask
