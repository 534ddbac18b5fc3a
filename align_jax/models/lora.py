"""LoRA: low-rank adapters beside a frozen decoder, merged into it, exported for `peft`.

An adapter on a projection W adds `scale * (x A) B`, A [in, R] and B [R, out], B initialised
to zero (so a fresh adapter changes nothing) and scale = alpha / R (alpha / sqrt(R) with
rslora). Adapters are a separate pytree stacked on the layers axis like the params:

  layers/attn/{q,k,v}_a  [L, D, R]     layers/attn/{q,k,v}_b  [L, R, N|K, H]
  layers/attn/o_a        [L, N, H, R]  layers/attn/o_b        [L, R, D]
  layers/mlp/{gate,up}_a [L, D, R]     layers/mlp/{gate,up}_b [L, R, F]
  layers/mlp/down_a      [L, F, R]     layers/mlp/down_b      [L, R, D]

They run through the same pure `transformer.forward`: pass `lora=adapters`, or pass
`with_adapters(params, adapters)` as the params (how losses see them, unchanged). The rank
axis is `axes.LORA_RANK`, which no sharding preset maps, so it stays replicated while the
other axes follow the params' rules.
"""

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from align_jax import axes
from align_jax.models.config import ModelConfig

# target: (module, param name, weight letters, letters contracted with the input)
TARGETS: dict[str, tuple[str, str, str, str]] = {
    "q": ("attn", "q_proj", "DNH", "D"),
    "k": ("attn", "k_proj", "DKH", "D"),
    "v": ("attn", "v_proj", "DKH", "D"),
    "o": ("attn", "o_proj", "NHD", "NH"),
    "gate": ("mlp", "gate", "DF", "D"),
    "up": ("mlp", "up", "DF", "D"),
    "down": ("mlp", "down", "FD", "F"),
}
_HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_LOGICAL = {"L": axes.LAYERS, "D": axes.EMBED, "N": axes.HEADS, "K": axes.KV_HEADS,
            "H": axes.HEAD_DIM, "F": axes.MLP, "R": axes.LORA_RANK}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """What to adapt and how.

    rank, alpha: the low rank R and the scale numerator (scale = alpha / R).
    targets: projections to adapt, among q, k, v, o, gate, up, down.
    dropout: dropout on the adapter's input while training (0: none).
    rslora: scale = alpha / sqrt(R) (rank-stabilised LoRA).
    base_dtype: the dtype the frozen base is held in while training (e.g. "bfloat16"); None
      keeps the config's param dtype. Adapters and their optimizer state stay float32.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0
    rslora: bool = False
    base_dtype: str | None = None

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoraConfig.targets={self.targets!r}: choose among {tuple(TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout}: must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_config(value: "LoraConfig | Mapping[str, Any] | None") -> "LoraConfig | None":
    """A LoraConfig from itself, a dict of its fields (gin), or None."""
    if value is None or isinstance(value, LoraConfig):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"lora={value!r}: give a dict of LoraConfig fields or a LoraConfig")
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"lora: unknown field(s) {unknown}; known: {sorted(fields)}")
    kw = dict(value)
    if "targets" in kw:
        kw["targets"] = tuple(kw["targets"])
    return LoraConfig(**kw)


@flax.struct.dataclass
class Adapters:
    """LoRA weights (the tree in the module docstring, B unscaled) and their settings."""

    weights: dict[str, Any]
    spec: LoraConfig = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class LoraParams:
    """Frozen base params with adapters: accepted by `forward` wherever params go.

    dropout_rng: a key for adapter dropout (training); None runs deterministically.
    """

    base: Any
    adapters: Adapters
    dropout_rng: jax.Array | None = None


def with_adapters(params: Any, adapters: Adapters, *, dropout_rng: jax.Array | None = None
                  ) -> LoraParams:
    return LoraParams(base=params, adapters=adapters, dropout_rng=dropout_rng)


def _dims(config: ModelConfig) -> dict[str, int]:
    return {"L": config.num_layers, "D": config.embed_dim, "N": config.num_heads,
            "K": config.num_kv_heads, "H": config.head_dim, "F": config.mlp_dim}


def _letters(target: str) -> tuple[str, str]:
    """Letters of A and B (without the layers axis)."""
    _, _, w, contracted = TARGETS[target]
    return contracted + "R", "R" + "".join(c for c in w if c not in contracted)


def _shapes(config: ModelConfig, spec: LoraConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """`<module>/<target>_<a|b>` -> (shape, letters incl. L) for every adapter tensor."""
    dims = {**_dims(config), "R": spec.rank}
    out = {}
    for t in spec.targets:
        module = TARGETS[t][0]
        for part, letters in zip("ab", _letters(t)):
            out[f"{module}/{t}_{part}"] = (tuple(dims[c] for c in "L" + letters), "L" + letters)
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {"layers": {}}
    for key, value in flat.items():
        module, name = key.split("/")
        tree["layers"].setdefault(module, {})[name] = value
    return tree


def lora_axes(config: ModelConfig, spec: LoraConfig) -> dict[str, Any]:
    """The logical axes of each adapter tensor (same tree as `Adapters.weights`)."""
    return _nest({k: tuple(_LOGICAL[c] for c in letters)
                  for k, (_, letters) in _shapes(config, spec).items()})


def abstract_lora(config: ModelConfig, spec: LoraConfig) -> dict[str, Any]:
    """The adapter weights as boxed ShapeDtypeStructs (float32); allocates nothing."""
    return _nest({k: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32),
                                             tuple(_LOGICAL[c] for c in letters))
                  for k, (shape, letters) in _shapes(config, spec).items()})


def init_lora_weights(config: ModelConfig, spec: LoraConfig, rng: jax.Array) -> dict[str, Any]:
    """Fresh float32 adapter weights: A uniform in +-1/sqrt(fan_in) (as peft), B zero."""
    flat = {}
    shapes = _shapes(config, spec)
    keys = jax.random.split(rng, len(shapes))
    for key, (name, (shape, _)) in zip(keys, sorted(shapes.items())):
        if name.endswith("_b"):
            flat[name] = jnp.zeros(shape, jnp.float32)
            continue
        fan_in = math.prod(shape[1:-1])
        bound = 1.0 / math.sqrt(fan_in)
        flat[name] = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    return _nest(flat)


def init_lora(config: ModelConfig, params: Any, *, rank: int, alpha: float,
              targets: Sequence[str], rng: jax.Array, dropout: float = 0.0,
              rslora: bool = False) -> Adapters:
    """Adapters for `params` (B zero-initialised, so the model is unchanged).

    Args:
      config: the model.
      params: its parameter tree (checked for the targeted projections).
      rank, alpha, targets, dropout, rslora: see `LoraConfig`.
      rng: key for A's initialisation.
    Returns:
      the Adapters (float32, on the default device; place them with `lora_axes`).
    """
    spec = LoraConfig(rank=rank, alpha=alpha, targets=tuple(targets), dropout=dropout,
                      rslora=rslora)
    for t in spec.targets:
        module, name, _, _ = TARGETS[t]
        if name not in params.get("layers", {}).get(module, {}):
            raise ValueError(f"init_lora: params have no layers/{module}/{name} for target {t!r}")
    return Adapters(weights=init_lora_weights(config, spec, rng), spec=spec)


def lora_variables(adapters: Adapters) -> dict[str, Any]:
    """The `lora` flax collection the modules read: B pre-multiplied by the scale.

    Scaling B here rather than in the module is the same function of (A, B), so gradients
    match peft's `scale * B(A x)` exactly.
    """
    scale = adapters.spec.scale
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale if str(path[-1].key).endswith("_b") else x, adapters.weights)


def merge_lora(config: ModelConfig, params: Any, adapters: Adapters) -> Any:
    """Params with every adapter folded in: W + scale * A B (float32 sum, W's dtype).

    Args:
      config: the model.
      params: the base parameter tree (not modified).
      adapters: from `init_lora` or training.
    Returns:
      a new parameter tree with the same structure and dtypes.
    """
    del config  # the shapes are in the arrays
    spec = adapters.spec
    layers = {m: dict(v) for m, v in params["layers"].items()}
    for t in spec.targets:
        module, name, w_letters, _ = TARGETS[t]
        a_letters, b_letters = _letters(t)
        w = layers[module][name]
        a = adapters.weights["layers"][module][f"{t}_a"]
        b = adapters.weights["layers"][module][f"{t}_b"]
        # Output letters in W's order: contracted then the rest, as W stores them.
        delta = jnp.einsum(f"L{a_letters},L{b_letters}->L{w_letters}",
                           a.astype(jnp.float32), b.astype(jnp.float32))
        layers[module][name] = (w.astype(jnp.float32) + spec.scale * delta).astype(w.dtype)
    return {**params, "layers": layers}


# --------------------------------------------------------------------------- peft export


def _to_torch_layout(t: str, a_i: np.ndarray, b_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's (A, B) -> peft's lora_A.weight [R, in] and lora_B.weight [out, R]."""
    r = a_i.shape[-1]
    a_t = a_i.reshape(-1, r).T  # contracted dims flattened in order (N*H for o)
    b_t = b_i.reshape(r, -1).T
    return np.ascontiguousarray(a_t), np.ascontiguousarray(b_t)


def save_peft(config: ModelConfig, adapters: Adapters, path: str | os.PathLike, *,
              base_model_name_or_path: str | None = None) -> None:
    """Writes `adapter_model.safetensors` and `adapter_config.json` that `peft` loads.

        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        model = peft.PeftModel.from_pretrained(model, path)

    Args:
      config: the model the adapters belong to.
      adapters: the adapters (float32 on export).
      path: output dir (created).
      base_model_name_or_path: recorded in the config for peft's convenience.
    """
    spec = adapters.spec
    host = jax.device_get(adapters.weights)
    tensors = {}
    for t in spec.targets:
        module = TARGETS[t][0]
        a = np.asarray(host["layers"][module][f"{t}_a"], np.float32)
        b = np.asarray(host["layers"][module][f"{t}_b"], np.float32)
        for i in range(config.num_layers):
            a_t, b_t = _to_torch_layout(t, a[i], b[i])
            pre = f"base_model.model.model.layers.{i}.{_HF_MODULE[t]}"
            tensors[f"{pre}.lora_A.weight"] = a_t
            tensors[f"{pre}.lora_B.weight"] = b_t
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
        "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
        "target_modules": sorted(_HF_MODULE[t].split(".")[1] for t in spec.targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
