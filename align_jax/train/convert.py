"""`align-jax convert`: a training checkpoint (orbax, any step) or a GGUF file to a Hugging
Face dir.

    align-jax convert --gin_param="convert.convert_main.run_dir='runs/sft'" \
      --gin_param="convert.convert_main.step=400" --output_dir=runs/sft/hf-400
    align-jax convert --gin_param="convert.convert_main.gguf='model.Q4_1.gguf'" \
      --output_dir=runs/smollm2-hf

A LoRA run (with `<run_dir>/model/lora.json`) exports the base with the adapters merged in
(export='merged', a plain HF checkpoint) or the adapters alone in peft's format (export='peft').
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.atomic import atomic_dir
from align_jax.models import lora
from align_jax.models.gguf import gguf_to_hf
from align_jax.models.hf import config_from_hf, save_hf
from align_jax.tokenizer import copy_tokenizer_files
from align_jax.train.adapters import read_lora_file, rebuild_base, write_peft_export
from align_jax.train.checkpoint import load_params


def convert_main(*, output_dir: str, run_dir: str | None = None, step: int | None = None,
                 export: str = "merged", gguf: str | None = None) -> int:
    """Exports one model to output_dir as a Hugging Face checkpoint directory.

    The export is written to a temporary folder and renamed over output_dir only when complete:
    a convert killed mid-way leaves an earlier export there intact.

    Args:
      output_dir: the directory written.
      run_dir: an `align-jax train` folder: the params of `<run_dir>/checkpoints` at `step`
        (default latest), with the config and tokenizer files of `<run_dir>/model`.
      step: the checkpoint step (with run_dir).
      export: for a LoRA run, "merged" (HF checkpoint of base + adapters) or "peft"
        (adapter_model.safetensors + adapter_config.json).
      gguf: a llama.cpp GGUF file (Llama family), dequantized to float32, with the tokenizer
        and chat template rebuilt from its metadata. Give either run_dir or gguf.
    """
    if (run_dir is None) == (gguf is None):
        raise ValueError("convert_main: give either run_dir (a training folder) or gguf "
                         "(a .gguf file)")
    if gguf is not None:
        gguf_to_hf(gguf, output_dir)
        print(f"wrote {output_dir} from {gguf}")
        return 0

    model_dir = os.path.join(run_dir, "model")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; is {run_dir} an `align-jax train` folder?")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    config = config_from_hf(raw, source=cfg_path)
    if export not in ("merged", "peft"):
        raise ValueError(f"convert_main.export={export!r}: choose 'merged' or 'peft'")
    params = load_params(os.path.join(run_dir, "checkpoints"), step=step)
    lora_run = read_lora_file(model_dir)
    if lora_run is None and export == "peft":
        raise ValueError(f"convert_main.export='peft': {run_dir} is not a LoRA run "
                         f"({model_dir}/lora.json is missing)")
    if lora_run is not None:
        spec, base = lora_run
        adapters = lora.Adapters(weights=params, spec=spec)
        if export == "peft":
            with atomic_dir(output_dir) as tmp:
                write_peft_export(
                    config, adapters, os.fspath(tmp), final_dir=output_dir,
                    init_from=base["init_from"], tokenizer_dir=model_dir,
                    base_params=lambda: jax.device_get(rebuild_base(config, spec, base)))
            print(f"wrote the peft adapter {output_dir} from {run_dir}/checkpoints "
                  f"(step {step or 'latest'})")
            return 0
        merged = lora.merge_lora(config, rebuild_base(config, spec, base), adapters)
        params = jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), merged)
    with atomic_dir(output_dir) as tmp:
        save_hf(config, params, os.fspath(tmp))
        copy_tokenizer_files(model_dir, os.fspath(tmp))
    print(f"wrote {output_dir} from {run_dir}/checkpoints (step {step or 'latest'})")
    return 0
