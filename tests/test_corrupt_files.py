"""Corrupt weights, configs and tokenizers: one line naming the file, never a silent fallback."""

import json
import os
import shutil
import struct

import gin
import jax
import pytest

from align_jax import cli
from align_jax.models import get_config, init_params, load_hf, save_hf
from align_jax.tokenizer import load_tokenizer
from align_jax.tokenizer_training import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["The cooperative repairs bicycles and radios for its members.",
          "Every member may ask why a repair costs what it costs.", "We fix, we teach, we share."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model with a trained tokenizer: a complete Hugging Face dir."""
    out = tmp_path_factory.mktemp("good")
    tok = train_tokenizer(CORPUS * 20, out, vocab_size=300)
    config = get_config("tiny", vocab_size=tok.vocab_size, num_layers=1)
    save_hf(config, jax.device_get(init_params(config, jax.random.key(0))), str(out))
    return str(out)


def _copy(model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def _header_len(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _truncate(p):
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size // 2)


def _empty(p):
    open(p, "wb").close()


def _huge_header(p):
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", 2**40))


def _bad_offsets(p):
    n = _header_len(p)
    with open(p, "rb") as f:
        data = f.read()
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**12]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("damage,why", [(_truncate, "truncated"), (_empty, "empty or truncated"),
                                        (_huge_header, "corrupt safetensors header"),
                                        (_bad_offsets, "outside")])
def test_corrupt_safetensors_is_one_line_naming_the_file(model_dir, tmp_path, damage, why):
    bad = _copy(model_dir, tmp_path)
    damage(bad / "model.safetensors")
    with pytest.raises(ValueError, match=why) as e:
        load_hf(str(bad))
    message = str(e.value)
    assert "\n" not in message and str(bad / "model.safetensors") in message


@pytest.mark.parametrize("text,why", [('{"model_type": "llama",', "not valid JSON"),
                                      (None, "hidden_size must be an integer, found '64'")])
def test_bad_config_json_names_file_and_field(model_dir, tmp_path, text, why):
    bad = _copy(model_dir, tmp_path)
    if text is None:
        cfg = json.loads((bad / "config.json").read_text())
        cfg["hidden_size"] = "64"
        text = json.dumps(cfg)
    (bad / "config.json").write_text(text)
    with pytest.raises(ValueError, match=why) as e:
        load_hf(str(bad))
    assert str(bad / "config.json") in str(e.value)


def test_corrupt_tokenizer_config_is_an_error_not_a_fallback(model_dir, tmp_path):
    good = load_tokenizer(model_dir)
    assert (good.bos_id, good.pad_id) == (2, 0)
    bad = _copy(model_dir, tmp_path)
    (bad / "tokenizer_config.json").write_text('{"bos_token": "<s>", ')
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(str(bad))
    only = tmp_path / "only_config"
    only.mkdir()
    shutil.copy(os.path.join(model_dir, "tokenizer_config.json"), only)
    with pytest.raises(ValueError, match="no vocabulary file") as e:
        load_tokenizer(str(only))
    assert "sentencepiece" not in str(e.value).split("(")[0]


def test_generate_cli_prints_one_line_for_corrupt_weights(model_dir, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    bad = _copy(model_dir, tmp_path)
    _truncate(bad / "model.safetensors")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    code = cli.main(["generate", f"--gin_param=entry.generate_main.model_dir='{bad}'",
                     f"--gin_param=entry.generate_main.prompts='{prompts}'",
                     f"--output_dir={tmp_path / 'gen'}"])
    gin.clear_config()
    err = capsys.readouterr().err
    assert code == 1
    assert str(bad / "model.safetensors") in err and "truncated" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # + the --traceback hint
