"""Tiny llama.cpp-style GGUF files written with the `gguf` writer, for the GGUF tests."""

import gguf
import hf_models
import numpy as np

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_chars():
    """GPT-2's printable stand-in for each byte (written out here, not imported)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(
        range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


MERGES = ["Ġ t", "h e", "Ġt he", "e r"]
TOKENS = SPECIALS + _byte_chars() + ["Ġt", "he", "Ġthe", "er"]
VOCAB = len(TOKENS)  # 263


def _permute(w, heads):
    """llama.cpp's convert_hf_to_gguf q/k row permutation (the one load_gguf undoes)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def write_tiny_gguf(path, model, *, arch="llama", types=None):
    """Writes `model` (a torch Llama) as a llama.cpp-style GGUF file.

    types: llama.cpp tensor name suffix -> GGML type (default F32 for all).
    """
    cfg = model.config
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10_000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                 "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf_name, name in per_layer.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = f"blk.{i}.{name}.weight"
    for hf_key, name in names.items():
        if hf_key not in sd or (hf_key == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        x = sd[hf_key]
        if name.endswith("attn_q.weight"):
            x = _permute(x, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            x = _permute(x, cfg.num_key_value_heads)
        kind = next((t for suffix, t in types.items() if name.endswith(suffix)), Q.F32)
        if kind == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(x))
        elif kind == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def tiny_llama(**overrides):
    """A tiny random torch Llama whose vocabulary is the GGUF token list below."""
    return hf_models.tiny_hf_model("llama", vocab_size=VOCAB, hidden_size=64,
                                   intermediate_size=128, rope_parameters={
                                       "rope_type": "default", "rope_theta": 10_000.0},
                                   **overrides)
