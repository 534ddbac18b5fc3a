"""`align-jax convert`: a training checkpoint (orbax, any step) or a GGUF file to a Hugging
Face dir.

    align-jax convert --gin_param="convert.convert_main.run_dir='runs/sft'" \
      --gin_param="convert.convert_main.step=400" --output_dir=runs/sft/hf-400
    align-jax convert --gin_param="convert.convert_main.gguf='model.Q4_1.gguf'" \
      --output_dir=runs/smollm2-hf
"""

import json
import os


def convert_main(*, output_dir: str, run_dir: str | None = None, step: int | None = None,
                 gguf: str | None = None) -> int:
    """Exports one model to output_dir as a Hugging Face checkpoint directory.

    Args:
      output_dir: the directory written.
      run_dir: an `align-jax train` folder: the params of `<run_dir>/checkpoints` at `step`
        (default latest), with the config and tokenizer files of `<run_dir>/model`.
      step: the checkpoint step (with run_dir).
      gguf: a llama.cpp GGUF file (Llama family), dequantized to float32, with the tokenizer
        and chat template rebuilt from its metadata. Give either run_dir or gguf.
    """
    if (run_dir is None) == (gguf is None):
        raise ValueError("convert_main: give either run_dir (a training folder) or gguf "
                         "(a .gguf file)")
    if gguf is not None:
        from align_jax.models.gguf import gguf_to_hf
        gguf_to_hf(gguf, output_dir)
        print(f"wrote {output_dir} from {gguf}")
        return 0
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
