"""One description per Hugging Face model family: adding a family is one entry in FAMILIES.

A `Family` holds everything family-specific about a checkpoint: which ModelConfig fields
every model of the family shares (`fixed`, checked on export), the rest of the config.json
translation in both directions, the tensor names and layouts (`align_jax.models.hf_layout`),
and the module names its LoRA adapters have in `peft`. `hf_config`, `hf_tensors`, `hf` and
`lora` read only this table; an unknown family is an error, never another family's keys.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from align_jax.models import hf_fields as f
from align_jax.models.config import ModelConfig
from align_jax.models.hf_layout import Layout, Tensor


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraModule:
    """Where a LoRA target lives in the transformers model, for the peft export.

    module: the module under a layer ("self_attn.q_proj").
    parameter: for experts, the stacked [E, out, in] parameter of `module` that peft adapts
      (`target_parameters`).
    rows: the output rows of a fused module (or fused parameter) this target fills, in our
      order of its output dims; None: all of them.
    """

    module: str
    parameter: str | None = None
    rows: Callable[[ModelConfig], np.ndarray] | None = None

    @property
    def name(self) -> str:
        return self.module if self.parameter is None else f"{self.module}.{self.parameter}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """A Hugging Face `model_type` (module docstring)."""

    name: str
    architecture: str
    layer_prefix: str  # with {i}: "model.layers.{i}."
    fixed: Mapping[str, Any]
    from_hf: Callable[[Mapping, str], dict[str, Any]]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    check: Callable[[ModelConfig], tuple[str, str] | None]  # (field, why) it cannot export
    tensors: Callable[[ModelConfig], list[Tensor]]
    lora: Mapping[str, LoraModule]
    conv1d: bool = False  # projections stored [in, out] (peft's fan_in_fan_out)
    # A key prefix that checkpoints saved from the bare model (no head) omit.
    bare_prefix: str = ""


# --------------------------------------------------------------------------- shared pieces

_ROPE_DENSE = dict(norm="rms", positions="rope", rope_fraction=1.0, residual="sequential",
                   gated_mlp=True, head_bias=False, num_experts=0, norm_offset=0.0,
                   scale_embeddings=False)
_LAYERNORM = dict(norm="layer", norm_offset=0.0, scale_embeddings=False, gated_mlp=False,
                  num_experts=0, sliding_window=None)


def _rope_common(hf: Mapping, source: str, *, tie_default: bool = False,
                 partial_ok: bool = False, norm_key: str = "rms_norm_eps",
                 norm_default: float = 1e-6, **rope_keys) -> dict[str, Any]:
    """The fields every RoPE family reads under the same keys."""
    embed_dim = f.integer(hf, "hidden_size", source)
    num_heads = f.integer(hf, "num_attention_heads", source)
    num_kv_heads = f.integer(hf, "num_key_value_heads", source, None)
    head_dim = f.integer(hf, "head_dim", source, None)
    max_position = f.integer(hf, "max_position_embeddings", source, 8192)
    theta, scaling, partial = f.rope_from_hf(hf, source, max_position, **rope_keys)
    out = dict(
        vocab_size=f.integer(hf, "vocab_size", source), embed_dim=embed_dim,
        num_layers=f.integer(hf, "num_hidden_layers", source), num_heads=num_heads,
        num_kv_heads=int(num_kv_heads if num_kv_heads is not None else num_heads),
        head_dim=int(head_dim if head_dim is not None else embed_dim // num_heads),
        mlp_dim=f.integer(hf, "intermediate_size", source),
        norm_eps=float(hf.get(norm_key, norm_default)), rope_theta=theta,
        rope_scaling=scaling, max_position=max_position,
        tie_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
        init_std=float(hf.get("initializer_range", 0.02)), **f.token_ids_from_hf(hf))
    if partial_ok:
        out["rope_fraction"] = partial
    elif partial != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={partial!r} is not supported")
    return out


def _rope_common_to_hf(config: ModelConfig, *, partial: bool = False) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.embed_dim,
        "intermediate_size": config.mlp_dim, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": f.ACTIVATION_TO_HF[config.activation],
        "max_position_embeddings": config.max_position,
        "rms_norm_eps" if config.norm == "rms" else "layer_norm_eps": config.norm_eps,
        **f.rope_to_hf(config, partial=partial),
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0,
    }


def _default_query_scale(config: ModelConfig) -> tuple[str, str] | None:
    if config.query_scale is not None and not math.isclose(config.query_scale,
                                                          config.head_dim ** -0.5):
        return "query_scale", "transformers scales queries by head_dim ** -0.5"
    return None


def _whole_heads(config: ModelConfig) -> tuple[str, str] | None:
    if config.num_kv_heads != config.num_heads:
        return "num_kv_heads", "this family has no grouped-query attention"
    if config.num_heads * config.head_dim != config.embed_dim:
        return "head_dim", "this family's heads split embed_dim evenly"
    return None


# --------------------------------------------------------------------------- Llama-style


def _llama_tensors(config: ModelConfig) -> list[Tensor]:
    c = config
    b = Layout(c, "model.layers.{i}.")
    d, ff, v = c.embed_dim, c.mlp_dim, c.vocab_size
    b.top("model.embed_tokens.weight", ("embedding",), (v, d), (v, d))
    for i in range(c.num_layers):
        b.attention(i, "self_attn", o_name="o_proj")
        if c.num_experts:
            b.layer(i, "block_sparse_moe.gate.weight", ("mlp", "router"), (c.num_experts, d),
                    (d, c.num_experts), "transpose")
            for e in range(c.num_experts):
                for name, ours, hf_shape in (("w1", "gate", (ff, d)), ("w2", "down", (d, ff)),
                                             ("w3", "up", (ff, d))):
                    b.layer(i, f"block_sparse_moe.experts.{e}.{name}.weight", ("mlp", ours),
                            hf_shape, hf_shape[::-1], "transpose", expert=e)
        else:
            for name in ("gate", "up", "down"):
                d_in, d_out = (ff, d) if name == "down" else (d, ff)
                b.linear(i, f"mlp.{name}_proj", ("mlp", name), d_in, d_out, c.mlp_bias)
        b.norm(i, "input_layernorm", "attn_norm")
        b.norm(i, "post_attention_layernorm", "mlp_norm")
    b.top_norm("model.norm", "final_norm")
    b.head()
    return b.out


_LLAMA_LORA = {"q": LoraModule(module="self_attn.q_proj"),
               "k": LoraModule(module="self_attn.k_proj"),
               "v": LoraModule(module="self_attn.v_proj"),
               "o": LoraModule(module="self_attn.o_proj"),
               "gate": LoraModule(module="mlp.gate_proj"),
               "up": LoraModule(module="mlp.up_proj"),
               "down": LoraModule(module="mlp.down_proj")}


def _llama_style(name: str, architecture: str, *, fixed: Mapping[str, Any],
                 from_hf: Callable, to_hf: Callable, check: Callable = _default_query_scale,
                 lora: Mapping[str, LoraModule] = _LLAMA_LORA) -> Family:
    return Family(name=name, architecture=architecture, layer_prefix="model.layers.{i}.",
                  fixed={**_ROPE_DENSE, **fixed}, from_hf=from_hf, to_hf=to_hf, check=check,
                  tensors=_llama_tensors, lora=lora)


def _llama_from_hf(hf, source):
    bias = bool(hf.get("attention_bias", False))
    return dict(_rope_common(hf, source), activation=f.activation_from_hf(hf, source),
                qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def _llama_check(config):
    if config.qkv_bias != config.out_bias:
        return "out_bias", "attention_bias sets q, k, v and o biases together"
    return _default_query_scale(config)


def _mistral_from_hf(hf, source):
    window = hf.get("sliding_window")
    return dict(_rope_common(hf, source), activation=f.activation_from_hf(hf, source),
                sliding_window=None if window is None else int(window))


def _qwen2_window(hf: Mapping, num_layers: int, source: str) -> int | None:
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", False) or window is None:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        start = hf.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= start else "full_attention"
                       for i in range(num_layers)]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return int(window)
    raise ValueError(f"{source}: layer_types mixes sliding and full attention "
                     f"({layer_types}); one kind for all layers is supported")


def _qwen2_from_hf(hf, source):
    out = dict(_rope_common(hf, source), activation=f.activation_from_hf(hf, source))
    return dict(out, sliding_window=_qwen2_window(hf, out["num_layers"], source))


def _qwen2_to_hf(config):
    window = config.sliding_window is not None
    return dict(_rope_common_to_hf(config), use_sliding_window=window,
                sliding_window=config.sliding_window,
                max_window_layers=0 if window else config.num_layers,
                layer_types=[("sliding" if window else "full") + "_attention"] *
                config.num_layers)


def _gemma_from_hf(hf, source):
    key = "hidden_activation" if hf.get("hidden_activation") is not None else "hidden_act"
    activation = f.activation_from_hf(hf, source, key=key, default="gelu_pytorch_tanh")
    # Gemma's original configs say "gelu" but the weights were trained with the tanh
    # approximation; transformers makes the same substitution.
    bias = bool(hf.get("attention_bias", False))
    return dict(_rope_common(hf, source, tie_default=True),
                activation="gelu_tanh" if activation == "gelu" else activation,
                qkv_bias=bias, out_bias=bias)


def _gemma_check(config):
    if config.activation == "gelu":
        return "activation", "transformers runs Gemma's 'gelu' as the tanh approximation"
    return _llama_check(config)


def _gemma_to_hf(config):
    out = _rope_common_to_hf(config)
    return dict(out, attention_bias=config.qkv_bias, hidden_activation=out["hidden_act"])


def _mixtral_from_hf(hf, source):
    jitter = float(hf.get("router_jitter_noise", 0.0) or 0.0)
    if jitter:
        raise ValueError(f"{source}: router_jitter_noise={jitter} is not supported (0 only)")
    window = hf.get("sliding_window")
    return dict(_rope_common(hf, source), activation=f.activation_from_hf(hf, source),
                sliding_window=None if window is None else int(window),
                num_experts=f.integer(hf, "num_local_experts", source),
                experts_per_token=f.integer(hf, "num_experts_per_tok", source),
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))


def _mixtral_check(config):
    if not config.num_experts:
        return "num_experts", "Mixtral is a mixture of experts (num_experts > 0)"
    return _default_query_scale(config)


def _mixtral_to_hf(config):
    return dict(_rope_common_to_hf(config), sliding_window=config.sliding_window,
                num_local_experts=config.num_experts,
                num_experts_per_tok=config.experts_per_token,
                router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=False,
                router_jitter_noise=0.0)


def _expert_rows(part: int):
    # transformers 5 fuses each expert's gate (w1) and up (w3) into gate_up_proj [E, 2F, D].
    return lambda c: np.arange(part * c.mlp_dim, (part + 1) * c.mlp_dim)


_MIXTRAL_LORA = {**{t: _LLAMA_LORA[t] for t in ("q", "k", "v", "o")},
                 "gate": LoraModule(module="mlp.experts", parameter="gate_up_proj",
                                    rows=_expert_rows(0)),
                 "up": LoraModule(module="mlp.experts", parameter="gate_up_proj",
                                  rows=_expert_rows(1)),
                 "down": LoraModule(module="mlp.experts", parameter="down_proj")}

_NO_BIAS = dict(qkv_bias=False, out_bias=False, mlp_bias=False)

# --------------------------------------------------------------------------- GPT-2


def _gpt2_from_hf(hf, source):
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(key):
            raise ValueError(f"{source}: {key}=true is not supported")
    d = f.integer(hf, "n_embd", source)
    n = f.integer(hf, "n_head", source)
    inner = hf.get("n_inner")
    return dict(vocab_size=f.integer(hf, "vocab_size", source), embed_dim=d,
                num_layers=f.integer(hf, "n_layer", source), num_heads=n, num_kv_heads=n,
                head_dim=d // n, mlp_dim=4 * d if inner is None else f.integer(hf, "n_inner",
                                                                             source),
                activation=f.activation_from_hf(hf, source, key="activation_function",
                                                default="gelu_new"),
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                max_position=f.integer(hf, "n_positions", source, 1024),
                query_scale=None if hf.get("scale_attn_weights", True) else 1.0,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                init_std=float(hf.get("initializer_range", 0.02)), **f.token_ids_from_hf(hf))


def _gpt2_check(config):
    if config.query_scale not in (None, 1.0) and not math.isclose(config.query_scale,
                                                                  config.head_dim ** -0.5):
        return "query_scale", "GPT-2 scales queries by head_dim ** -0.5 or not at all"
    return _whole_heads(config)


def _gpt2_to_hf(config):
    return {"vocab_size": config.vocab_size, "n_embd": config.embed_dim,
            "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": config.mlp_dim,
            "n_positions": config.max_position, "activation_function":
            "gelu_new" if config.activation == "gelu_tanh" else config.activation,
            "layer_norm_epsilon": config.norm_eps,
            "scale_attn_weights": config.query_scale != 1.0,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "add_cross_attention": False, "tie_word_embeddings": config.tie_embeddings}


def _gpt2_tensors(config: ModelConfig) -> list[Tensor]:
    c = config
    b = Layout(c, "transformer.h.{i}.")
    d, ff, v, n, h = c.embed_dim, c.mlp_dim, c.vocab_size, c.num_heads, c.head_dim
    b.top("transformer.wte.weight", ("embedding",), (v, d), (v, d))
    b.top("transformer.wpe.weight", ("position_embedding",), (c.max_position, d),
          (c.max_position, d))
    qkv = [("attn", f"{x}_proj") for x in "qkv"]
    for i in range(c.num_layers):
        b.norm(i, "ln_1", "attn_norm")
        # Conv1D stores [in, out]: c_attn [D, 3D] is q, k, v side by side.
        b.layer(i, "attn.c_attn.weight", qkv, (d, 3 * d), [(d, n, h)] * 3, "split_last")
        b.layer(i, "attn.c_attn.bias", [(p, f"{x[0]}_bias") for p, x in qkv], (3 * d,),
                [(n, h)] * 3, "split_last")
        b.layer(i, "attn.c_proj.weight", ("attn", "o_proj"), (d, d), (n, h, d))
        b.layer(i, "attn.c_proj.bias", ("attn", "o_bias"), (d,), (d,))
        b.norm(i, "ln_2", "mlp_norm")
        for key, name, shape in (("c_fc", "up", (d, ff)), ("c_proj", "down", (ff, d))):
            b.layer(i, f"mlp.{key}.weight", ("mlp", name), shape, shape)
            b.layer(i, f"mlp.{key}.bias", ("mlp", f"{name}_bias"), shape[1:], shape[1:])
    b.top_norm("transformer.ln_f", "final_norm")
    b.head()
    return b.out


def _block_rows(part: int):
    return lambda c: np.arange(part * c.embed_dim, (part + 1) * c.embed_dim)


# --------------------------------------------------------------------------- GPT-NeoX


def _neox_from_hf(hf, source):
    out = _rope_common(hf, source, partial_ok=True, norm_key="layer_norm_eps",
                       norm_default=1e-5, theta_key="rotary_emb_base", partial_key="rotary_pct",
                       default_partial=0.25)
    bias = bool(hf.get("attention_bias", True))
    residual = "parallel" if hf.get("use_parallel_residual", True) else "sequential"
    return dict(out, num_kv_heads=out["num_heads"],
                head_dim=out["embed_dim"] // out["num_heads"],
                activation=f.activation_from_hf(hf, source, default="gelu"), residual=residual,
                qkv_bias=bias, out_bias=bias)


def _neox_check(config):
    if config.qkv_bias != config.out_bias:
        return "out_bias", "attention_bias sets the qkv and dense biases together"
    return _whole_heads(config) or _default_query_scale(config)


def _neox_to_hf(config):
    out = _rope_common_to_hf(config, partial=True)
    for key in ("num_key_value_heads", "head_dim", "attention_dropout"):
        out.pop(key)
    return dict(out, rotary_pct=config.rope_fraction,
                rotary_emb_base=config.rope_theta, attention_bias=config.qkv_bias,
                use_parallel_residual=config.residual == "parallel")


def _neox_tensors(config: ModelConfig) -> list[Tensor]:
    c = config
    b = Layout(c, "gpt_neox.layers.{i}.")
    d, ff, v, n, h = c.embed_dim, c.mlp_dim, c.vocab_size, c.num_heads, c.head_dim
    b.top("gpt_neox.embed_in.weight", ("embedding",), (v, d), (v, d))
    qkv = [("attn", f"{x}_proj") for x in "qkv"]
    for i in range(c.num_layers):
        b.norm(i, "input_layernorm", "attn_norm")
        b.norm(i, "post_attention_layernorm", "mlp_norm")
        b.layer(i, "attention.query_key_value.weight", qkv, (3 * d, d), [(d, n, h)] * 3,
                "neox_qkv")
        if c.qkv_bias:
            b.layer(i, "attention.query_key_value.bias", [(p, f"{x[0]}_bias") for p, x in qkv],
                    (3 * d,), [(n, h)] * 3, "neox_qkv_bias")
        b.layer(i, "attention.dense.weight", ("attn", "o_proj"), (d, d), (n, h, d), "heads_out")
        if c.out_bias:
            b.layer(i, "attention.dense.bias", ("attn", "o_bias"), (d,), (d,))
        b.linear(i, "mlp.dense_h_to_4h", ("mlp", "up"), d, ff, True)
        b.linear(i, "mlp.dense_4h_to_h", ("mlp", "down"), ff, d, True)
    b.top_norm("gpt_neox.final_layer_norm", "final_norm")
    b.head("embed_out")
    return b.out


def _neox_rows(part: int):
    # query_key_value's output is [N, 3, H]: head n's q, k, v rows are n*3H + part*H + h.
    def rows(c):
        n, h = np.meshgrid(np.arange(c.num_heads), np.arange(c.head_dim), indexing="ij")
        return (n * 3 * c.head_dim + part * c.head_dim + h).reshape(-1)
    return rows


# --------------------------------------------------------------------------- Phi


def _phi_from_hf(hf, source):
    if hf.get("qk_layernorm"):
        raise ValueError(f"{source}: qk_layernorm=true is not supported")
    out = _rope_common(hf, source, partial_ok=True, norm_key="layer_norm_eps",
                       norm_default=1e-5, default_partial=0.5)
    return dict(out, activation=f.activation_from_hf(hf, source, default="gelu_new"))


def _phi_to_hf(config):
    out = _rope_common_to_hf(config, partial=True)
    act = "gelu_new" if config.activation == "gelu_tanh" else out["hidden_act"]
    return dict(out, hidden_act=act, partial_rotary_factor=config.rope_fraction,
                qk_layernorm=False)


def _phi_tensors(config: ModelConfig) -> list[Tensor]:
    c = config
    b = Layout(c, "model.layers.{i}.")
    d, ff, v = c.embed_dim, c.mlp_dim, c.vocab_size
    b.top("model.embed_tokens.weight", ("embedding",), (v, d), (v, d))
    for i in range(c.num_layers):
        b.attention(i, "self_attn", o_name="dense")
        b.linear(i, "mlp.fc1", ("mlp", "up"), d, ff, True)
        b.linear(i, "mlp.fc2", ("mlp", "down"), ff, d, True)
        b.norm(i, "input_layernorm", "attn_norm")
    b.top_norm("model.final_layernorm", "final_norm")
    b.head()
    return b.out


# --------------------------------------------------------------------------- the table

_BIASED = dict(qkv_bias=True, out_bias=True, mlp_bias=True, head_bias=False)

FAMILIES: dict[str, Family] = {family.name: family for family in (
    _llama_style("llama", "LlamaForCausalLM", fixed=dict(sliding_window=None),
                 from_hf=_llama_from_hf, check=_llama_check,
                 to_hf=lambda c: dict(_rope_common_to_hf(c), attention_bias=c.qkv_bias,
                                      mlp_bias=c.mlp_bias)),
    _llama_style("mistral", "MistralForCausalLM", fixed=_NO_BIAS, from_hf=_mistral_from_hf,
                 to_hf=lambda c: dict(_rope_common_to_hf(c), sliding_window=c.sliding_window)),
    _llama_style("qwen2", "Qwen2ForCausalLM",
                 fixed=dict(qkv_bias=True, out_bias=False, mlp_bias=False),
                 from_hf=_qwen2_from_hf, to_hf=_qwen2_to_hf),
    _llama_style("gemma", "GemmaForCausalLM",
                 fixed=dict(norm_offset=1.0, scale_embeddings=True, mlp_bias=False,
                            sliding_window=None),
                 from_hf=_gemma_from_hf, to_hf=_gemma_to_hf, check=_gemma_check),
    Family(name="mixtral", architecture="MixtralForCausalLM", layer_prefix="model.layers.{i}.",
           fixed={**{k: v for k, v in _ROPE_DENSE.items() if k != "num_experts"}, **_NO_BIAS},
           from_hf=_mixtral_from_hf,
           to_hf=_mixtral_to_hf, check=_mixtral_check, tensors=_llama_tensors,
           lora=_MIXTRAL_LORA),
    Family(name="gpt2", architecture="GPT2LMHeadModel", layer_prefix="transformer.h.{i}.",
           fixed=dict(_LAYERNORM, **_BIASED, positions="learned", residual="sequential",
                      rope_fraction=1.0, rope_scaling=None),
           from_hf=_gpt2_from_hf, to_hf=_gpt2_to_hf, check=_gpt2_check, tensors=_gpt2_tensors,
           lora={"q": LoraModule(module="attn.c_attn", rows=_block_rows(0)),
                 "k": LoraModule(module="attn.c_attn", rows=_block_rows(1)),
                 "v": LoraModule(module="attn.c_attn", rows=_block_rows(2)),
                 "o": LoraModule(module="attn.c_proj"), "up": LoraModule(module="mlp.c_fc"),
                 "down": LoraModule(module="mlp.c_proj")},
           conv1d=True, bare_prefix="transformer."),
    Family(name="gpt_neox", architecture="GPTNeoXForCausalLM",
           layer_prefix="gpt_neox.layers.{i}.",
           fixed=dict(_LAYERNORM, mlp_bias=True, head_bias=False, positions="rope"),
           from_hf=_neox_from_hf, to_hf=_neox_to_hf, check=_neox_check, tensors=_neox_tensors,
           lora={"q": LoraModule(module="attention.query_key_value", rows=_neox_rows(0)),
                 "k": LoraModule(module="attention.query_key_value", rows=_neox_rows(1)),
                 "v": LoraModule(module="attention.query_key_value", rows=_neox_rows(2)),
                 "o": LoraModule(module="attention.dense"),
                 "up": LoraModule(module="mlp.dense_h_to_4h"),
                 "down": LoraModule(module="mlp.dense_4h_to_h")}),
    Family(name="phi", architecture="PhiForCausalLM", layer_prefix="model.layers.{i}.",
           fixed={**_LAYERNORM, **_BIASED, "head_bias": True, "positions": "rope",
                  "residual": "parallel_shared_norm"},
           from_hf=_phi_from_hf, to_hf=_phi_to_hf, check=_default_query_scale,
           tensors=_phi_tensors,
           lora={"q": LoraModule(module="self_attn.q_proj"),
                 "k": LoraModule(module="self_attn.k_proj"),
                 "v": LoraModule(module="self_attn.v_proj"),
                 "o": LoraModule(module="self_attn.dense"), "up": LoraModule(module="mlp.fc1"),
                 "down": LoraModule(module="mlp.fc2")}),
)}


def get_family(name: str, *, source: str) -> Family:
    """The family of Hugging Face model_type `name`; `source` prefixes the error."""
    if name not in FAMILIES:
        raise ValueError(f"{source}: model_type={name!r} is not supported "
                         f"(supported: {sorted(FAMILIES)})")
    return FAMILIES[name]
