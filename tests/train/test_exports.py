"""Exports load with the Hugging Face Auto classes, offline: the tokenizer is written with every
export and a peft adapter names a local base (`AutoPeftModelForCausalLM` needs nothing else)."""

import json
import os
import pathlib
import sys

import gin
import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from align_jax import cli
from align_jax.models import hf, transformer
from align_jax.models.config import get_config
from align_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from tiny_checkpoints import tiny_document_model  # noqa: E402
from tokenizer_families import FAMILIES, build_family_tokenizer  # noqa: E402

LORA = "entry.train_main.lora={'rank': 4, 'alpha': 8, 'targets': ('q', 'v', 'down')}"
TEXTS = ["Honesty and care are values.", "The sky is"]
# float32 forward passes in two frameworks differ in reduction order; on a 2-layer tiny model
# with O(1) logits that stays well below 1e-4 (the bound the peft parity tests use).
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gin.clear_config()
    yield
    gin.clear_config()


def _train(out, *params):
    args = ["train", "--gin_file=configs/runs/sft_tiny.gin", f"--output_dir={out}",
            "--gin_param=entry.train_main.progress=False",
            "--gin_param=entry.train_main.num_steps=3",
            "--gin_param=optim.OptimizerConfig.learning_rate=1e-2",
            "--gin_param=optim.OptimizerConfig.schedule='constant'",
            *[f"--gin_param={p}" for p in params]]
    assert cli.main(args) == 0


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], dtype=torch.long)).logits.float().numpy()[0]


def _check_loads_with_auto_classes(run, base_dir):
    """run/hf and run/peft load through the Auto classes and agree with our merged model."""
    ours = load_tokenizer(run / "hf")
    config, merged = hf.load_hf(str(run / "hf"))
    for folder in ("hf", "peft"):
        auto_tok = transformers.AutoTokenizer.from_pretrained(str(run / folder))
        for text in TEXTS:
            assert auto_tok(text)["input_ids"] == ours.encode_input(text)
    adapter_cfg = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == os.path.abspath(base_dir)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(
        str(run / "peft"), dtype=torch.float32, attn_implementation="eager").eval()
    ids = ours.encode_input(TEXTS[0])
    want = np.asarray(transformer.forward(config, merged, np.asarray([ids], np.int32)))[0]
    base_cfg, base_params = hf.load_hf(str(base_dir))
    base = np.asarray(transformer.forward(base_cfg, base_params, np.asarray([ids], np.int32)))[0]
    assert np.abs(want - base).max() > 1e-3, "training should have moved the adapters"
    np.testing.assert_allclose(_torch_logits(model, ids), want, atol=ATOL, rtol=0)


def test_lora_run_from_a_checkpoint_exports_load_offline(tmp_path):
    base = tiny_document_model(tmp_path / "base")
    run = tmp_path / "run"
    _train(run, "MODEL=None", "TOKENIZER=None", f"HF_CHECKPOINT='{base}'", LORA)
    _check_loads_with_auto_classes(run, base)

    # `align-jax convert export='peft'` of the same checkpoint: the same base and tokenizer.
    gin.clear_config()
    assert cli.main(["convert", f"--output_dir={tmp_path / 'peft2'}",
                     f"--gin_param=convert.convert_main.run_dir='{run}'",
                     "--gin_param=convert.convert_main.export='peft'"]) == 0
    cfg = json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(base)
    auto_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "peft2"))
    assert auto_tok(TEXTS[0])["input_ids"] == load_tokenizer(base).encode_input(TEXTS[0])


def test_random_init_lora_run_writes_its_base_next_to_the_adapter(tmp_path):
    run = tmp_path / "run"
    _train(run, LORA)  # sft_tiny: a random tiny model and a tokenizer trained on the document
    assert (run / "peft" / "base" / "config.json").exists()
    _check_loads_with_auto_classes(run, run / "peft" / "base")
    # The merged export minus its adapters is the base: the base written is the frozen one.
    gin.clear_config()
    assert cli.main(["convert", f"--output_dir={tmp_path / 'peft2'}",
                     f"--gin_param=convert.convert_main.run_dir='{run}'",
                     "--gin_param=convert.convert_main.export='peft'"]) == 0
    _, a = hf.load_hf(str(run / "peft" / "base"))
    _, b = hf.load_hf(str(tmp_path / "peft2" / "base"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_hf_writes_a_tokenizer_auto_tokenizer_loads(tmp_path, family):
    tok = load_tokenizer(build_family_tokenizer(family, str(tmp_path / "tok")),
                         chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    cfg = get_config("tiny", vocab_size=tok.vocab_size)
    hf.save_hf(cfg, transformer.init_params(cfg, jax.random.key(0)), str(tmp_path / "out"),
               tokenizer=tok)
    auto_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in TEXTS:
        assert auto_tok(text)["input_ids"] == tok.encode_input(text)
    messages = [{"role": "user", "content": "hi"}]
    assert auto_tok.apply_chat_template(messages, tokenize=False) == "[hi]"
    assert load_tokenizer(tmp_path / "out").apply_chat_template(messages) == "[hi]"


def test_save_hf_writes_a_lone_sentencepiece_model_auto_tokenizer_loads(tmp_path):
    from align_jax.tokenizer_training import train_tokenizer
    train_tokenizer(["The sky is blue. Once upon a time, values."] * 20, tmp_path / "t",
                    vocab_size=300)
    os.makedirs(tmp_path / "lone")
    os.replace(tmp_path / "t" / "tokenizer.model", tmp_path / "lone" / "sp.model")
    tok = load_tokenizer(tmp_path / "lone" / "sp.model")
    cfg = get_config("tiny", vocab_size=tok.vocab_size)
    hf.save_hf(cfg, transformer.init_params(cfg, jax.random.key(0)), str(tmp_path / "out"),
               tokenizer=tok)
    auto_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in [*TEXTS, " two  spaces", "a<s>b"]:
        assert auto_tok(text)["input_ids"] == tok.encode_input(text)


def test_load_tokenizer_names_the_known_models_for_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        load_tokenizer(tmp_path / "nope")


@pytest.mark.slow
def test_load_tokenizer_resolves_a_named_model_like_load_hf(smollm2_dir):
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.path == smollm2_dir
    assert tok.encode("Hello") == load_tokenizer(smollm2_dir).encode("Hello")


def _metrics(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def test_lora_from_continues_a_peft_adapter(tmp_path):
    from align_jax.models import lora
    from align_jax.train import load_params

    base = tiny_document_model(tmp_path / "base")
    first = tmp_path / "first"
    # peft's module names as targets.
    _train(first, "MODEL=None", "TOKENIZER=None", f"HF_CHECKPOINT='{base}'",
           "entry.train_main.lora={'rank': 4, 'alpha': 8, "
           "'targets': ('q_proj', 'v_proj', 'down_proj')}", "entry.train_main.log_every=1")
    config, _ = hf.load_hf(str(base))
    # Export, load back: the adapters equal the run's last checkpoint exactly.
    loaded = lora.load_peft(config, first / "peft")
    assert loaded.spec.targets == ("q", "v", "down") and loaded.spec.rank == 4
    saved = load_params(first / "checkpoints")
    for x, y in zip(jax.tree.leaves(loaded.weights), jax.tree.leaves(jax.device_get(saved))):
        np.testing.assert_array_equal(x, y)

    # Continue one step from the adapter; init_from comes from its base_model_name_or_path.
    gin.clear_config()
    second = tmp_path / "second"
    _train(second, "MODEL=None", "TOKENIZER=None", f"entry.train_main.lora_from='{first}/peft'",
           "entry.train_main.num_steps=1", "entry.train_main.log_every=1",
           # sft_tiny warms up from lr 0
           "optim.OptimizerConfig.warmup_steps=0", "optim.OptimizerConfig.warmup_ratio=0.0")
    # The same first batch (same seed) scores lower with the trained adapters than with the
    # fresh ones (B = 0, the base) the first run started from.
    assert _metrics(second)[0]["loss"] < _metrics(first)[0]["loss"] - 1e-3
    cont = lora.load_peft(config, second / "peft")
    assert cont.spec == loaded.spec
    moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                for x, y in zip(jax.tree.leaves(cont.weights), jax.tree.leaves(loaded.weights)))
    assert moved > 0, "one step should update the continued adapters"
    cfg = json.loads((second / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(base)

    # Settings that contradict the adapter are refused in one line naming the field.
    gin.clear_config()
    with pytest.raises(ValueError, match=r"lora\['rank'\]=8 disagrees"):
        cli.main(["train", "--gin_file=configs/runs/sft_tiny.gin",
                  f"--output_dir={tmp_path / 'third'}", "--gin_param=MODEL=None",
                  "--gin_param=TOKENIZER=None", "--gin_param=entry.train_main.progress=False",
                  f"--gin_param=entry.train_main.lora_from='{first}/peft'",
                  "--gin_param=entry.train_main.lora={'rank': 8}", "--traceback"])
