"""Small Hugging Face tokenizer dirs, built offline, with each family's special-token rules.

What transformers' `tokenizer(text)` adds to a raw input differs by family, and is what a raw
prompt must get to match the model's training:

  smollm2  byte-level BPE, bos_token <|im_start|> set but no post-processor template: no BOS
  llama3   TemplateProcessing "<|begin_of_text|> $A": BOS
  qwen2    no bos_token at all, no template: nothing
  gemma    GemmaTokenizer with add_bos_token true and a "<bos> $A" template: BOS

The vocabularies are trained here on a few sentences (BpeTrainer, seconds), so nothing is
downloaded; the files mimic the real ones' tokenizer_config.json fields and post-processors.
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = ["The sky is blue and the grass is green.",
          "Once upon a time there was a small town by the river.",
          "Honesty, care, fairness and respect are values we keep.",
          "One two three four five six seven eight nine ten."] * 4

FAMILIES = {
    "smollm2": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "config": {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>",
                           "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                           "pad_token": "<|im_end|>", "add_prefix_space": False},
                "template": None, "bos": None},
    "llama3": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
               "config": {"tokenizer_class": "PreTrainedTokenizerFast",
                          "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               "template": "<|begin_of_text|>", "bos": "<|begin_of_text|>"},
    "qwen2": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "config": {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
                         "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                         "unk_token": None},
              "template": None, "bos": None},
    "gemma": {"specials": ["<pad>", "<eos>", "<bos>", "<unk>"],
              "config": {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>",
                         "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                         "add_bos_token": True, "add_eos_token": False},
              "template": "<bos>", "bos": "<bos>"},
}


def build_family_tokenizer(family: str, out_dir: str) -> str:
    """Writes tokenizer.json + tokenizer_config.json of `family`'s style into out_dir."""
    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if spec["template"] is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos = spec["template"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {**spec["config"], "model_max_length": 4096,
              "clean_up_tokenization_spaces": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return out_dir
