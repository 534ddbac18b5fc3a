"""`align-jax convert`: a training checkpoint (orbax, any step) to a Hugging Face dir.

    align-jax convert --gin_param="convert.convert_main.run_dir='runs/sft'" \
      --gin_param="convert.convert_main.step=400" --output_dir=runs/sft/hf-400

A LoRA run (with `<run_dir>/model/lora.json`) exports the base with the adapters merged in
(export='merged', a plain HF checkpoint) or the adapters alone in peft's format (export='peft').
"""

import json
import os

import numpy as np


def convert_main(*, run_dir: str, output_dir: str, step: int | None = None,
                 export: str = "merged") -> int:
    """Exports the params of `<run_dir>/checkpoints` at `step` (default latest) to output_dir.

    The model config comes from `<run_dir>/model/config.json`, written by `align-jax train`;
    the tokenizer files from `<run_dir>/model` too. For a LoRA run, `export` is "merged" (HF
    checkpoint of base + adapters) or "peft" (adapter_model.safetensors + adapter_config.json).
    """
    from align_jax.models.hf import config_from_hf, save_hf
    from align_jax.tokenizer import copy_tokenizer_files
    from align_jax.train.checkpoint import load_params

    model_dir = os.path.join(run_dir, "model")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; is {run_dir} an `align-jax train` folder?")
    with open(cfg_path) as f:
        config = config_from_hf(json.load(f), source=cfg_path)
    if export not in ("merged", "peft"):
        raise ValueError(f"convert_main.export={export!r}: choose 'merged' or 'peft'")
    params = load_params(os.path.join(run_dir, "checkpoints"), step=step)
    from align_jax.train.adapters import read_lora_file
    lora_run = read_lora_file(model_dir)
    if lora_run is None and export == "peft":
        raise ValueError(f"convert_main.export='peft': {run_dir} is not a LoRA run "
                         f"({model_dir}/lora.json is missing)")
    if lora_run is not None:
        import jax
        import jax.numpy as jnp

        from align_jax.models import lora
        from align_jax.train.adapters import rebuild_base
        spec, base = lora_run
        adapters = lora.Adapters(weights=params, spec=spec)
        if export == "peft":
            lora.save_peft(config, adapters, output_dir, base_model_name_or_path=base["init_from"])
            print(f"wrote the peft adapter {output_dir} from {run_dir}/checkpoints "
                  f"(step {step or 'latest'})")
            return 0
        merged = lora.merge_lora(config, rebuild_base(config, spec, base), adapters)
        params = jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), merged)
    save_hf(config, params, output_dir)
    copy_tokenizer_files(model_dir, output_dir)
    print(f"wrote {output_dir} from {run_dir}/checkpoints (step {step or 'latest'})")
    return 0
