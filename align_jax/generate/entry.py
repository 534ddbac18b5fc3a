"""`align-jax generate`: completions for a JSONL file of prompts, from an HF checkpoint dir.

    align-jax generate --gin_param="entry.generate_main.model_dir='runs/demo/dpo/hf'" \
      --gin_param="entry.generate_main.prompts='examples/sft.jsonl'" --output_dir=runs/gen
"""

import os
from collections.abc import Sequence

from align_jax import distributed
from align_jax.generate import generate
from align_jax.jsonl import decode_line, numbered_lines, write_jsonl
from align_jax.models.hf import load_hf
from align_jax.models.named import resolve_model_path
from align_jax.runinfo import run_folder
from align_jax.tokenizer import encode_prompt, load_tokenizer, validate_messages


def _read_prompts(path: str) -> list[dict]:
    """Prompt rows of a JSONL file; a bad line is a one-line error naming path:line."""
    rows = []
    for n, raw in numbered_lines(path):
        row = decode_line(raw, where=f"{path}:{n}")
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise ValueError(f"{path}:{n}: needs a 'prompt' string or a 'messages' list")
        if "messages" in row:
            try:
                validate_messages(row["messages"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: field 'messages': {e}") from None
        elif not isinstance(row["prompt"], str):
            raise ValueError(f"{path}:{n}: field 'prompt' must be a string, got "
                             f"{type(row['prompt']).__name__}")
        elif not row["prompt"].strip():
            raise ValueError(f"{path}:{n}: field 'prompt' is empty or only whitespace")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def generate_main(*, output_dir: str, model_dir: str, prompts: str, chat: bool = True,
                  max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = 0, seed: int = 0, stop_strings: Sequence[str] = (),
                  batch_size: int = 32) -> int:
    """Writes <output_dir>/completions.jsonl: each input row plus completion and finish_reason.

    Args:
      output_dir: run folder.
      model_dir: Hugging Face checkpoint dir with tokenizer files, a .gguf file, or a named
        default such as 'smollm2-135m-instruct' (align_jax/models/named.py).
      prompts: JSONL with `prompt` (str) or `messages` (chat) per line.
      chat: apply the model's chat template to `prompt` rows.
      max_new_tokens, temperature, top_p, top_k, seed, stop_strings: sampling.
      batch_size: rows per device batch.
    """
    rows = _read_prompts(prompts)
    with run_folder(output_dir):
        config, params = load_hf(model_dir)
        tok = load_tokenizer(resolve_model_path(model_dir))
        # The one prompt encoder, as the server and SDG use it: a raw prompt gets the
        # tokenizer's own special tokens (transformers' `tokenizer(text)`).
        ids = [encode_prompt(tok, row["messages"] if "messages" in row else row["prompt"],
                             chat_template=chat or "messages" in row) for row in rows]
        out = generate(config, params, ids, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                       stop_strings=tuple(stop_strings), tokenizer=tok, batch_size=batch_size)
        path = os.path.join(output_dir, "completions.jsonl")
        if distributed.is_main():
            write_jsonl(path, ({**row, "completion": text, "finish_reason": reason}
                               for row, text, reason in zip(rows, out.texts, out.finish_reasons)))
    print(f"wrote {len(rows)} completions to {path}")
    return 0
