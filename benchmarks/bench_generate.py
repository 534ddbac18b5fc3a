"""Generation (issue 4): align_jax.generate vs transformers' generate, same weights, same prompts.

Greedy, EOS ignored on both sides (transformers: min_new_tokens = max_new_tokens), so both
produce exactly max_new_tokens per prompt; every measurement is taken after a warm-up call, so
compilation is excluded. "tok/s" counts new tokens over the whole call (prefill included);
"decode tok/s" removes the prefill: B (M - 1) / (t(M) - t(1)), where t(1) is a call that only
prefills and draws the first token. Then the number of compilations (prefill + decode traces)
for 100 prompts of mixed lengths, and for a second, different set of 100.

On a GPU also a 1B-class config in bf16 at batch 1 and 64, and the fraction of the memory
bandwidth bound reached by one batch-1 decode step: (weight bytes + KV cache bytes read per
step) / step time / peak bandwidth. transformers runs on the CPU build of torch here, so its
GPU columns stay empty.
"""

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.generate import generate, trace_counts
from align_jax.models import hf, transformer
from align_jax.models.config import get_config
from benchmarks import common

# The train section's CPU model (~4.2M parameters).
CPU_CONFIG = dict(vocab_size=4096, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=64, mlp_dim=768, max_position=2048)
# Peak HBM bandwidth in bytes/s by a substring of jax's device_kind.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "TPU v5 lite": 8.19e11,
                  "TPU v5p": 2.76e12, "TPU v4": 1.2e12}


def _prompts(n, length, vocab, seed):
    rng = np.random.default_rng(seed)
    lengths = [length] * n if np.isscalar(length) else list(length)
    return [rng.integers(4, vocab, size=int(k)).tolist() for k in lengths]


def _jax_call(config, params, prompts, new):
    out = generate(config, params, prompts, max_new_tokens=new, temperature=0.0,
                   ignore_eos=True, batch_size=len(prompts))
    assert all(len(t) == new for t in out.tokens), "align_jax stopped early"
    return out.tokens


def _torch_model(config, params):
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()  # the "Loading weights" bar
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_hf(config, params, tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return model.eval()


def _torch_call(model, prompts, new):
    import torch
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert out.shape[1] == ids.shape[1] + new, "transformers stopped early"
    return out[:, ids.shape[1]:].tolist()


def _rates(call, batch, new, iters):
    """(tok/s over the whole call, decode-only tok/s, seconds of one decode step)."""
    t_full = common.timeit(lambda: call(new), warmup=1, iters=iters)
    t_one = common.timeit(lambda: call(1), warmup=1, iters=iters)
    step = max(t_full - t_one, 1e-9) / (new - 1)
    return batch * new / t_full, batch / step, step


def _agreement(a, b):
    """Fraction of generated positions where both sides chose the same token (before the
    first disagreement of a row; afterwards the contexts differ)."""
    same = total = 0
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        same += n
        total += len(x)
    return same / max(total, 1)


def cpu_rows(args):
    import torch
    torch.set_num_threads(max(1, os.cpu_count()))
    config = get_config("small_20m", **CPU_CONFIG)
    params = transformer.init_params(config, jax.random.key(0))
    model = _torch_model(config, params)
    rows = []
    for batch in args.batches:
        prompts = _prompts(batch, args.prompt_len, config.vocab_size, seed=batch)
        jax_tokens = _jax_call(config, params, prompts, args.new_tokens)
        torch_tokens = _torch_call(model, prompts, args.new_tokens)
        j_tps, j_dec, _ = _rates(lambda n, p=prompts: _jax_call(config, params, p, n), batch,
                                 args.new_tokens, args.iters)
        t_tps, t_dec, _ = _rates(lambda n, p=prompts: _torch_call(model, p, n), batch,
                                 args.new_tokens, args.iters)
        rows.append({"what": f"greedy B={batch} prompt={args.prompt_len} new={args.new_tokens} "
                             f"({config.num_params / 1e6:.1f}M f32)",
                     "align_jax tok/s": j_tps, "transformers tok/s": t_tps,
                     "align_jax/transformers": j_tps / t_tps,
                     "align_jax decode tok/s": j_dec, "transformers decode tok/s": t_dec,
                     "decode ratio": j_dec / t_dec,
                     "same greedy tokens": _agreement(jax_tokens, torch_tokens)})
    return rows, config, params


def compile_rows(config, params, args):
    rows = []
    for seed in (100, 101):
        lengths = np.random.default_rng(seed).integers(3, 200, size=100)
        prompts = _prompts(100, lengths, config.vocab_size, seed=seed)
        before = trace_counts()
        t0 = time.perf_counter()
        generate(config, params, prompts, max_new_tokens=16, temperature=0.0, ignore_eos=True)
        wall = time.perf_counter() - t0
        after = trace_counts()
        new = {k: after.get(k, 0) - before.get(k, 0) for k in ("prefill", "decode")}
        rows.append({"what": f"100 prompts, lengths 3-199 (set {seed - 99}), new=16, default "
                             "batching",
                     "prefill compiles": new["prefill"], "decode compiles": new["decode"],
                     "wall s (compiles included)": wall})
    return rows


def gpu_rows(dev, args):
    config = get_config("llama3_1b", dtype="bfloat16", param_dtype="bfloat16")
    params = transformer.init_params(config, jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in dev.device_kind), None)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    rows = []
    prompt_len, new = 128, 256
    for batch in (1, 64):
        prompts = _prompts(batch, prompt_len, config.vocab_size, seed=batch)
        _jax_call(config, params, prompts, new)
        tps, dec, step = _rates(lambda n, p=prompts: _jax_call(config, params, p, n), batch, new,
                                args.iters)
        row = {"what": f"llama3_1b bf16 greedy B={batch} prompt={prompt_len} new={new} on "
                       f"{dev.device_kind}",
               "align_jax tok/s": tps, "align_jax decode tok/s": dec,
               "transformers tok/s": float("nan"), "decode step ms": step * 1e3,
               "bandwidth bound fraction": float("nan")}
        if batch == 1 and peak:
            # Decode reads every weight once and the whole cache (all slots, masked) per step.
            slots = prompt_len + new - 1
            cache_bytes = (2 * config.num_layers * batch * slots * config.num_kv_heads
                           * config.head_dim * 2)
            row["bandwidth bound fraction"] = (weight_bytes + cache_bytes) / step / peak
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)
    # The side-by-side runs on the CPU (torch here is a CPU build), also on a GPU machine.
    with jax.default_device(jax.devices("cpu")[0]):
        rows, config, params = cpu_rows(args)
        comp = compile_rows(config, params, args)
    dev = jax.devices()[0]
    gpu = gpu_rows(dev, args) if dev.platform == "gpu" else []
    print(common.table(rows))
    print()
    print(common.table(comp))
    if gpu:
        print()
        print(common.table(gpu))
    common.save("generate", rows + comp + gpu)


if __name__ == "__main__":
    main()
