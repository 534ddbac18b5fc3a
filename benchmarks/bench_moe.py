"""Mixture of experts (issue 26): the capacity dispatch vs a dense one, memory and time.

One MoE layer, Mixtral's routing (E = 8 experts, top 2), forward + backward (gradients of
the params and the input), jitted on one device:
  * align_jax's dispatch (`models.moe`): tokens gathered into [B, E, C, D] per row, C slots per
    expert at capacity factor cf (C = ceil(cf * T * k / E), at most T);
  * dense: every token through every expert ([B, T, E, F]), unselected outputs weighted 0; the
    textbook reference (written here, same routing), never dropping.
Memory is XLA's compiled temporaries of the step (`memory_analysis().temp_size_in_bytes`);
"max |diff|" compares the outputs (they differ only where the capacity dropped assignments).
"""

import argparse
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from align_jax.models import layers, moe
from align_jax.models.config import get_config
from benchmarks import common


def _dense(params, x_BTD, cfg):
    """Every token through every expert; the router's top-k weights pick the outputs."""
    p = params["params"]
    probs_BTE = jax.nn.softmax((x_BTD @ p["router"]).astype(jnp.float32), axis=-1)
    top_BTk, expert_BTk = jax.lax.top_k(probs_BTE, cfg.experts_per_token)
    w_BTk = top_BTk / jnp.sum(top_BTk, axis=-1, keepdims=True)
    w_BTE = jnp.sum(jax.nn.one_hot(expert_BTk, cfg.num_experts) * w_BTk[..., None], axis=2)
    act = layers.ACTIVATIONS[cfg.activation]
    h_BTEF = act(jnp.einsum("BTD,EDF->BTEF", x_BTD, p["gate"])) * jnp.einsum(
        "BTD,EDF->BTEF", x_BTD, p["up"])
    y_BTED = jnp.einsum("BTEF,EFD->BTED", h_BTEF, p["down"])
    return jnp.einsum("BTED,BTE->BTD", y_BTED, w_BTE)


def _step(apply):
    def loss(params, x):
        return jnp.sum(apply(params, x) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def run(*, batch, seq, embed, mlp, factors, iters):
    rows = []
    base = get_config("tiny", family="mixtral", embed_dim=embed, mlp_dim=mlp, num_experts=8,
                      experts_per_token=2, init_std=0.05)
    x = jax.random.normal(jax.random.key(1), (batch, seq, embed), jnp.float32)
    seg = jnp.ones((batch, seq), jnp.int32)
    params = nn.unbox(moe.MoE(base).init(jax.random.key(0), x, seg))
    dense_out = jax.jit(lambda p, x: _dense(p, x, base))(params, x)
    cases = [("dense", None)] + [("capacity", cf) for cf in factors]
    for name, cf in cases:
        if cf is None:
            step = _step(lambda p, x: _dense(p, x, base))
            out, dropped, slots = dense_out, 0.0, seq
        else:
            cfg = dataclasses.replace(base, capacity_factor=cf)
            layer = moe.MoE(cfg)
            step = _step(lambda p, x, layer=layer: layer.apply(p, x, seg)[0])
            out, stats = jax.jit(lambda p, x, layer=layer: layer.apply(p, x, seg))(params, x)
            dropped = float(stats["dropped"]) / (batch * seq * cfg.experts_per_token)
            slots = moe.capacity(cfg, seq)
        mem = step.lower(params, x).compile().memory_analysis().temp_size_in_bytes
        t = common.timeit(lambda step=step: jax.block_until_ready(step(params, x)), iters=iters)
        rows.append({
            "dispatch": name, "capacity factor": "-" if cf is None else cf,
            "slots/expert": slots, "temp MB": round(mem / 2**20, 1),
            "fwd+bwd ms": round(1e3 * t, 1), "dropped %": round(100 * dropped, 2),
            "max |diff| vs dense": float(np.abs(np.asarray(out - dense_out)).max()),
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--embed", type=int, default=128)
    parser.add_argument("--mlp", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    rows = run(batch=args.batch, seq=args.seq, embed=args.embed, mlp=args.mlp,
               factors=(1.25, 2.0, 4.0), iters=args.iters)
    print(f"MoE layer, E=8 top-2, B={args.batch} T={args.seq} D={args.embed} F={args.mlp} "
          f"({common.hardware()})")
    print(common.table(rows))
    common.save("moe", rows)


if __name__ == "__main__":
    main()
