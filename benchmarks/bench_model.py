"""Forward+backward of one model config: align_jax (jit) vs transformers (torch), same batch.

On a GPU also reports tokens/s and model FLOPs utilisation of a 1B-class config in bf16.
"""

import argparse

import jax
import jax.numpy as jnp

from align_jax.models import hf, transformer
from align_jax.models.config import get_config
from benchmarks import common

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5p": 459e12}


def _nll(config, params, tokens_BT):
    logits = transformer.forward(config, params, tokens_BT[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1))


def bench_jax(config, batch, seq):
    params = transformer.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
    step = jax.jit(jax.value_and_grad(lambda p, t: _nll(config, p, t)))
    return common.timeit(lambda: jax.block_until_ready(step(params, tokens))), params


def bench_torch(config, batch, seq):
    import torch
    import transformers
    torch.set_num_threads(max(1, __import__("os").cpu_count()))
    hf_config = transformers.AutoConfig.for_model(**hf.config_to_hf(config))
    model = transformers.AutoModelForCausalLM.from_config(hf_config).float()
    model.config._attn_implementation = "sdpa"
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(tokens[:, :-1], labels=None)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        loss = -logp.gather(-1, tokens[:, 1:, None]).mean()
        loss.backward()

    return common.timeit(run)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small_20m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)
    rows = []
    config = get_config(args.config)
    t_jax, _ = bench_jax(config, args.batch, args.seq)
    t_torch = bench_torch(config, args.batch, args.seq)
    tokens = args.batch * args.seq
    rows.append({"what": f"fwd+bwd {args.config} ({config.num_params / 1e6:.1f}M) "
                         f"B={args.batch} T={args.seq} f32",
                 "align_jax s": t_jax, "torch s": t_torch, "torch/align_jax": t_torch / t_jax,
                 "align_jax tok/s": tokens / t_jax, "torch tok/s": tokens / t_torch})
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        big = get_config("llama3_1b", dtype="bfloat16", remat="dots")
        t, _ = bench_jax(big, 8, 2048)
        peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), None)
        tps = 8 * 2048 / t
        rows.append({"what": f"fwd+bwd llama3_1b bf16 B=8 T=2048 on {dev.device_kind}",
                     "align_jax s": t, "torch s": float("nan"), "torch/align_jax": float("nan"),
                     "align_jax tok/s": tps, "torch tok/s": float("nan"),
                     "mfu": big.flops_per_token(2048) * tps / peak if peak else float("nan")})
    print(common.table(rows))
    common.save("model", rows)


if __name__ == "__main__":
    main()
