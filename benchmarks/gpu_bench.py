"""Issue 14's GPU figures, one measurement per process; `benchmarks/gpu.sh` runs them all.

    python benchmarks/gpu_bench.py jax-train --method sft --attention auto --remat full
    python benchmarks/gpu_bench.py jax-decode --batch 64
    python benchmarks/gpu_bench.py jax-score --batch 64   # issue 11: scores during generation
    python benchmarks/gpu_bench.py torch-train --method dpo
    python benchmarks/gpu_bench.py torch-decode --batch 1
    python benchmarks/gpu_bench.py report OUT_DIR        # results/*.json -> a markdown table

Imports only jax, flax, optax, orbax, numpy, torch and transformers (and align_jax's model,
loss and train-step modules, which need nothing else): the device machine has no gin, grain or
datasets. JAX and torch never share a process (JAX preallocates most of the GPU memory).
Every command appends one JSON line to --out. `--smoke` swaps in a tiny model and tiny shapes
so the whole script runs on a CPU in a minute or two.

The model is `llama3_1b` (Llama-3.2-1B shapes, random weights); training is float32 master
weights with bfloat16 compute on both sides (torch: autocast, SDPA attention, fused AdamW);
8 x 2048 tokens per SFT step, 4 pairs x 2 x 2048 per DPO step. MFU is against the datasheet
bf16 dense peak (H200/H100: 989 TFLOP/s). Decode is greedy, prompt 128, 256 new tokens; its
bandwidth fraction is (bf16 weights + the filled KV cache read per step) / step time / 4.8 TB/s.
"""

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

PEAK_FLOPS = 989e12
HBM_BYTES_PER_S = 4.8e12
FULL = dict(seq=2048, sft_batch=8, dpo_pairs=4, prompt=128, new=256, steps=8, warmup=2,
            eval_new=64, answer=40)
SMOKE = dict(seq=64, sft_batch=2, dpo_pairs=1, prompt=8, new=8, steps=2, warmup=1,
             eval_new=8, answer=6)
SMOKE_MODEL = dict(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, mlp_dim=128)


def _llama_shapes(smoke: bool) -> dict:
    """The model shapes both sides build (llama3_1b, or a tiny one for --smoke)."""
    if smoke:
        return dict(SMOKE_MODEL, rope_theta=10_000.0, tie=True, llama3_rope=False)
    return dict(vocab_size=128_256, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                head_dim=64, mlp_dim=8192, rope_theta=500_000.0, tie=True, llama3_rope=True)


def _batch(shape: dict, sizes: dict, method: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens; SFT [B, T], DPO [P, 2, T]; loss on the second half of each row."""
    rng = np.random.default_rng(seed)
    t = sizes["seq"]
    lead = (sizes["sft_batch"],) if method == "sft" else (sizes["dpo_pairs"], 2)
    tokens = rng.integers(0, shape["vocab_size"], (*lead, t + 1)).astype(np.int32)
    mask = np.zeros((*lead, t), np.float32)
    mask[..., t // 2:] = 1.0
    batch = {"tokens": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": mask,
             "segment_ids": np.ones((*lead, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (*lead, t)).copy()}
    if method == "dpo":
        batch["ref_logps"] = rng.normal(-float(t), 1.0, (sizes["dpo_pairs"], 2)).astype(np.float32)
    return batch


def _flops_per_token(shape: dict, seq: int) -> float:
    d, h, f = shape["embed_dim"], shape["head_dim"], shape["mlp_dim"]
    n, k, L = shape["num_heads"], shape["num_kv_heads"], shape["num_layers"]
    matmul = L * (d * h * (2 * n + 2 * k) + 3 * d * f) + d * shape["vocab_size"]
    return 6 * matmul + 12 * L * n * h * seq


def _emit(out: str, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")


# -- JAX ------------------------------------------------------------------------------------------

def _jax_config(shape: dict, **kw):
    from align_jax.models.config import ModelConfig, RopeScaling
    scaling = RopeScaling(kind="llama3", factor=32.0) if shape["llama3_rope"] else None
    return ModelConfig(vocab_size=shape["vocab_size"], embed_dim=shape["embed_dim"],
                       num_layers=shape["num_layers"], num_heads=shape["num_heads"],
                       num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
                       mlp_dim=shape["mlp_dim"], tie_embeddings=shape["tie"], norm_eps=1e-5,
                       rope_theta=shape["rope_theta"], rope_scaling=scaling,
                       max_position=8192, **kw)


def _jax_peak_bytes() -> int | None:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def jax_train(args, shape, sizes) -> dict:
    import jax

    from align_jax import sharding
    from align_jax.losses import objectives
    from align_jax.models import transformer
    from align_jax.train import compile as compile_lib
    from align_jax.train import optim
    from align_jax.train import state as state_lib

    config = _jax_config(shape, dtype="bfloat16", param_dtype="float32",
                         attention=args.attention, remat=args.remat)
    kwargs = {"vocab_chunk_size": args.vocab_chunk} if args.vocab_chunk is not None else {}
    mesh = sharding.make_mesh(sharding.MeshSpec(), devices=jax.devices()[:1])
    tx, schedule = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-5),
                                        num_steps=100)
    abstract = state_lib.abstract_state(transformer.abstract_params(config), tx=tx)
    shardings = state_lib.train_state_shardings(abstract, mesh, "fsdp")
    params = transformer.init_params(config, jax.random.key(0), mesh=mesh)
    state = compile_lib.init_train_state(params, tx=tx, seed=0, state_shardings=shardings)
    step = compile_lib.jit_train_step(
        loss=objectives.get_objective(args.method).bind(config=config, options=kwargs), tx=tx,
        schedule=schedule, grad_accum=1, mesh=mesh, rules="fsdp", state_shardings=shardings)
    batch = jax.device_put(_batch(shape, sizes, args.method),
                           compile_lib.batch_shardings(mesh, "fsdp"))
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    loss0 = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(sizes["warmup"]):
        state, metrics = step(state, batch)
    float(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(sizes["steps"]):
        state, metrics = step(state, batch)
    loss = float(metrics["loss"])
    dt = (time.perf_counter() - t0) / sizes["steps"]
    tokens = int(np.prod(batch["tokens"].shape))
    tps = tokens / dt
    return dict(step_s=dt, tokens_per_s=tps, compile_s=compile_s, loss_first=loss0,
                loss_last=loss, mfu=tps * _flops_per_token(shape, sizes["seq"]) / PEAK_FLOPS,
                peak_bytes=_jax_peak_bytes())


def jax_decode(args, shape, sizes) -> dict:
    import jax

    from align_jax.generate.loop import generate
    from align_jax.models import transformer

    config = _jax_config(shape, dtype="bfloat16", param_dtype="bfloat16",
                         attention=args.attention, bos_token_id=None, eos_token_id=None)
    params = transformer.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, shape["vocab_size"], (args.batch, sizes["prompt"])).tolist()
    run = lambda: generate(config, params, prompts, max_new_tokens=sizes["new"],  # noqa: E731
                           batch_size=args.batch, max_len=sizes["prompt"] + sizes["new"],
                           ignore_eos=True, chunk_size=sizes["new"])
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run()
    dt = time.perf_counter() - t0
    assert all(len(t) == sizes["new"] for t in out.tokens)
    return _decode_record(shape, sizes, args.batch, dt, compile_s=compile_s)


def jax_score(args, shape, sizes) -> dict:
    """Issue 11's evaluation on a device: greedy answers (eval_new tokens) alone, then the same
    generation also scoring 3 held-out answers per prompt (~`answer` tokens each) from its own
    prefill, as `evaluate_models` does; the share is what the teacher-forced scores add."""
    import jax

    from align_jax.generate.loop import generate
    from align_jax.models import transformer

    config = _jax_config(shape, dtype="bfloat16", param_dtype="bfloat16",
                         attention=args.attention, bos_token_id=None, eos_token_id=None)
    params = transformer.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, shape["vocab_size"], (args.batch, sizes["prompt"])).tolist()
    lengths = (sizes["answer"] - 4, sizes["answer"], sizes["answer"] + 4)
    answers = [[rng.integers(0, shape["vocab_size"], n).tolist() for n in lengths]
               for _ in prompts]
    new = sizes["eval_new"]

    def run(continuations=None):
        return generate(config, params, prompts, max_new_tokens=new, batch_size=args.batch,
                        max_len=sizes["prompt"] + max(new, max(lengths)), ignore_eos=True,
                        chunk_size=new, continuations=continuations)
    seconds, compile_s = {}, 0.0
    for name, conts in (("generation", None), ("scored", answers)):
        t0 = time.perf_counter()
        out = run(conts)
        compile_s += time.perf_counter() - t0
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = run(conts)
            times.append(time.perf_counter() - t0)
        seconds[name] = min(times)
    assert len(out.continuation_logps[0]) == 3
    share = seconds["scored"] / seconds["generation"] - 1
    return dict(tokens_per_s=args.batch * new / seconds["generation"],
                generation_s=seconds["generation"], scored_s=seconds["scored"],
                scoring_share=share, compile_s=compile_s)


def _decode_record(shape, sizes, batch, seconds, **extra) -> dict:
    """Tokens/s and the bandwidth fraction (prefill included in the time, as users see it)."""
    d, h, f = shape["embed_dim"], shape["head_dim"], shape["mlp_dim"]
    n, k, L = shape["num_heads"], shape["num_kv_heads"], shape["num_layers"]
    weights = 2 * (L * (d * h * (2 * n + 2 * k) + 3 * d * f) + d * shape["vocab_size"])
    mean_filled = sizes["prompt"] + sizes["new"] / 2
    kv = 2 * 2 * L * batch * mean_filled * k * h
    step_s = seconds / sizes["new"]
    return dict(tokens_per_s=batch * sizes["new"] / seconds, ms_per_step=1e3 * step_s,
                bandwidth_fraction=(weights + kv) / step_s / HBM_BYTES_PER_S, **extra)


# -- torch ----------------------------------------------------------------------------------------

def _torch_model(shape, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    scaling = (dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192) if shape["llama3_rope"] else None)
    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["embed_dim"],
                      intermediate_size=shape["mlp_dim"], num_hidden_layers=shape["num_layers"],
                      num_attention_heads=shape["num_heads"],
                      num_key_value_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
                      tie_word_embeddings=shape["tie"], rope_theta=shape["rope_theta"],
                      rope_scaling=scaling, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      attn_implementation="sdpa", bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return LlamaForCausalLM(cfg).to(device=dev, dtype=dtype), dev


def torch_train(args, shape, sizes) -> dict:
    import torch
    import torch.nn.functional as F

    model, dev = _torch_model(shape, torch.float32)
    model.train()
    cuda = dev == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    b = {k: torch.as_tensor(v, device=dev) for k, v in _batch(shape, sizes, args.method).items()}
    t = sizes["seq"]

    def seq_logps(tokens, targets, mask):
        logits = model(input_ids=tokens).logits.float()
        lp = torch.gather(F.log_softmax(logits, -1), -1, targets[..., None].long())[..., 0]
        return lp * mask

    def loss_fn():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            if args.method == "sft":
                lp = seq_logps(b["tokens"].long(), b["targets"], b["loss_mask"])
                return -lp.sum() / b["loss_mask"].sum()
            lp = seq_logps(b["tokens"].reshape(-1, t).long(), b["targets"].reshape(-1, t),
                           b["loss_mask"].reshape(-1, t)).sum(-1).reshape(-1, 2)
            ratio = (lp - b["ref_logps"]) @ torch.tensor([1.0, -1.0], device=dev)
            return -F.logsigmoid(0.1 * ratio).mean()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loss0 = float(step())
    for _ in range(sizes["warmup"]):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(sizes["steps"]):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / sizes["steps"]
    tps = b["tokens"].numel() / dt
    return dict(step_s=dt, tokens_per_s=tps, loss_first=loss0, loss_last=float(loss),
                mfu=tps * _flops_per_token(shape, sizes["seq"]) / PEAK_FLOPS,
                peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)


def torch_decode(args, shape, sizes) -> dict:
    import torch
    model, dev = _torch_model(shape, torch.bfloat16)
    model.eval()
    rng = np.random.default_rng(1)
    ids = torch.as_tensor(rng.integers(0, shape["vocab_size"], (args.batch, sizes["prompt"])),
                          device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=sizes["new"], min_new_tokens=sizes["new"],
                                  do_sample=False, pad_token_id=0)
    run()
    sync()
    t0 = time.perf_counter()
    out = run()
    sync()
    dt = time.perf_counter() - t0
    assert out.shape == (args.batch, sizes["prompt"] + sizes["new"])
    return _decode_record(shape, sizes, args.batch, dt)


# -- report ---------------------------------------------------------------------------------------

def report(out_dir: str) -> str:
    """A markdown table of every record in out_dir/results.jsonl, torch rows next to JAX's."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "results.jsonl"))]
    torch_tps = {r["method"]: r["tokens_per_s"] for r in rows
                 if r["side"] == "torch" and r["kind"] == "train" and "tokens_per_s" in r}
    torch_dec = {r["batch"]: r["tokens_per_s"] for r in rows
                 if r["side"] == "torch" and r["kind"] == "decode" and "tokens_per_s" in r}
    lines = ["| what | side | tokens/s | vs torch | MFU / bandwidth | peak memory | compile |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "train":
            what = f"{r['method'].upper()} {r.get('attention', '')} remat {r.get('remat', '')}"
            base = torch_tps.get(r["method"])
            util = f"MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        elif r["kind"] == "score":
            what = (f"greedy answers + 3 scored answers, batch {r['batch']} (teacher-forced "
                    f"scores: {100 * r['scoring_share']:+.1f}% of the generation)"
                    if "scoring_share" in r else f"scored answers, batch {r['batch']}")
            base, util = None, ""
        else:
            what = f"greedy decode, batch {r['batch']}"
            base = torch_dec.get(r["batch"])
            util = (f"{100 * r['bandwidth_fraction']:.0f}% of 4.8 TB/s, "
                    f"{r['ms_per_step']:.2f} ms/step" if "ms_per_step" in r else "")
        if "error" in r:
            lines.append(f"| {what} | {r['side']} | fails: {r['error'][:120]} | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base and r["side"] == "jax" else ""
        mem = f"{r['peak_bytes'] / 1e9:.1f} GB" if r.get("peak_bytes") else ""
        comp = f"{r['compile_s']:.0f} s" if r.get("compile_s") else ""
        lines.append(f"| {what} | {r['side']} | {r['tokens_per_s']:,.0f} | {ratio} | {util} | "
                     f"{mem} | {comp} |")
    return "\n".join(lines)


COMMANDS = {"jax-train": ("jax", "train", jax_train), "jax-decode": ("jax", "decode", jax_decode),
            "jax-score": ("jax", "score", jax_score),
            "torch-train": ("torch", "train", torch_train),
            "torch-decode": ("torch", "decode", torch_decode)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=[*COMMANDS, "report"])
    p.add_argument("out", help="results.jsonl to append to (report: the folder)")
    p.add_argument("--smoke", action="store_true", help="tiny model and shapes (CPU check)")
    p.add_argument("--method", choices=["sft", "dpo"], default="sft")
    p.add_argument("--attention", default="auto")
    p.add_argument("--remat", default="full")
    p.add_argument("--vocab_chunk", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    if args.command == "report":
        print(report(args.out))
        return 0
    side, kind, fn = COMMANDS[args.command]
    shape, sizes = _llama_shapes(args.smoke), SMOKE if args.smoke else FULL
    record = dict(side=side, kind=kind, method=args.method, batch=args.batch, smoke=args.smoke)
    if side == "jax":
        record.update(attention=args.attention, remat=args.remat)
    try:
        record.update(fn(args, shape, sizes))
    except Exception as e:  # noqa: BLE001  (an OOM or unsupported kernel is a result to report)
        traceback.print_exc()
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    _emit(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
