"""`align-jax convert`: a training checkpoint (orbax, any step) to a Hugging Face dir.

    align-jax convert --gin_param="convert.convert_main.run_dir='runs/sft'" \
      --gin_param="convert.convert_main.step=400" --output_dir=runs/sft/hf-400
"""

import json
import os


def convert_main(*, run_dir: str, output_dir: str, step: int | None = None) -> int:
    """Exports the params of `<run_dir>/checkpoints` at `step` (default latest) to output_dir.

    The model config comes from `<run_dir>/model/config.json`, written by `align-jax train`;
    the tokenizer files from `<run_dir>/model` too.
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
    params = load_params(os.path.join(run_dir, "checkpoints"), step=step)
    save_hf(config, params, output_dir)
    copy_tokenizer_files(model_dir, output_dir)
    print(f"wrote {output_dir} from {run_dir}/checkpoints (step {step or 'latest'})")
    return 0
