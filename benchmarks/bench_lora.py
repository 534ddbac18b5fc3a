"""LoRA (issue 13): LoRA vs full fine-tuning, step time and step memory, side by side.

1. On the CPU benchmark model (the 4.2M Llama-style model of bench_train): SFT and DPO steps,
   full fine-tuning vs LoRA (rank 8 on q, k, v, o, gate, up, down), measured. Full DPO keeps its
   reference as frozen params (a reference forward each step); LoRA DPO scores the reference
   with the adapters off, on the same weights.
2. A 1B-class config (llama3_1b), DPO: XLA's compiled memory of the step, from shapes alone
   (nothing runs, no weights): full fine-tuning with frozen reference params vs LoRA on a
   float32 and on a bfloat16 base.
3. Llama-3.1-8B shapes: the LoRA DPO step on a bfloat16 base, memory per device on one device
   and, with 8 devices, under fsdp over 8.
On a GPU, section 1 also runs the 1B-class config in bf16 (tokens/s, measured).
"""

import argparse

import jax
import jax.numpy as jnp

from align_jax import sharding
from align_jax.losses.objectives import get_objective
from align_jax.models import lora as lora_lib
from align_jax.models import transformer
from align_jax.models.config import get_config
from align_jax.train import adapters, optim
from align_jax.train import compile as compile_lib
from align_jax.train.state import train_state_shardings
from benchmarks import common
from benchmarks.bench_train import _config, _dpo_batch, _sft_batch

LORA = lora_lib.LoraConfig(rank=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down"))
BETA = 0.1


def _loss(config, kind):
    options = {} if kind == "sft" else {"beta": BETA}
    return get_objective(kind).bind(config=config, options=options)


def _bytes(m) -> float:
    """Live arguments + temporaries + outputs that are not donated aliases."""
    return float(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes)


def measured(config, kind, batch, *, lora, iters, device):
    """(median step s, XLA step bytes) of a real run of the step on `device`."""
    mesh = sharding.make_mesh(sharding.MeshSpec(data=1), devices=[device])
    rules = "dp"
    tx, _ = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-5), num_steps=1000)
    reference = kind == "dpo"
    abstract = adapters.abstract_run_state(config, tx=tx, lora=lora, with_ref=reference)
    shardings = train_state_shardings(abstract, mesh, rules)
    params = transformer.init_params(config, jax.random.key(0), mesh=mesh, rules=rules)
    if lora is None:
        ref = jax.tree.map(lambda x: x.copy(), params) if reference else None
        state = compile_lib.init_train_state(params, tx=tx, seed=0, state_shardings=shardings,
                                             ref_params=ref)
    else:
        base = jax.tree.map(lambda x: x.astype(adapters.base_config(config, lora).param_dtype),
                            params)
        weights = lora_lib.init_lora_weights(config, lora, jax.random.key(1))
        state = compile_lib.init_train_state(weights, tx=tx, seed=0, state_shardings=shardings,
                                             ref_params=base)
    loss = _loss(config, kind)
    if lora is not None:
        loss = adapters.bind_lora_loss(loss, lora, reference=reference)
    step = compile_lib.jit_train_step(loss=loss, tx=tx, schedule=None, grad_accum=1, mesh=mesh,
                                      rules=rules, state_shardings=shardings)
    batch = jax.device_put(batch, compile_lib.batch_shardings(mesh, rules))
    with sharding.use_mesh(mesh, rules):
        mem = _bytes(step.jitted.lower(state, batch).compile().memory_analysis())
    box = {"state": state}

    def run():
        box["state"], metrics = step(box["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return common.timeit(run, warmup=2, iters=iters), mem


def abstract_dpo_bytes(config, *, lora, pairs, seq, mesh=None, rules="fsdp") -> float:
    """Compiled DPO step bytes per device from shapes (full FT keeps frozen reference params)."""
    tx, _ = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-5), num_steps=1000)
    loss = _loss(config, "dpo")
    i32 = jnp.int32
    batch = {"tokens": jax.ShapeDtypeStruct((pairs, 2, seq), i32),
             "targets": jax.ShapeDtypeStruct((pairs, 2, seq), i32),
             "loss_mask": jax.ShapeDtypeStruct((pairs, 2, seq), jnp.float32),
             "positions": jax.ShapeDtypeStruct((pairs, 2, seq), i32),
             "segment_ids": jax.ShapeDtypeStruct((pairs, 2, seq), i32)}
    m = adapters.compiled_step_memory(config, loss, batch=batch, tx=tx, lora=lora,
                                      reference=True, mesh=mesh, rules=rules)
    return _bytes(m)


def cpu_rows(args, device):
    config = _config("cpu_5m")
    sft = _sft_batch(config.vocab_size, args.batch, args.seq, args.prompt_len)
    dpo = _dpo_batch(config.vocab_size, args.batch, args.seq, args.prompt_len)
    rows = []
    for kind, batch in (("sft", sft), ("dpo", dpo)):
        t_full, m_full = measured(config, kind, batch, lora=None, iters=args.iters, device=device)
        t_lora, m_lora = measured(config, kind, batch, lora=LORA, iters=args.iters,
                                  device=device)
        rows.append({"what": f"{kind.upper()} cpu_5m ({config.num_params / 1e6:.1f}M) "
                             f"B={args.batch} T={args.seq} f32",
                     "full s": t_full, "LoRA s": t_lora, "LoRA/full time": t_lora / t_full,
                     "full step MB": m_full / 2**20, "LoRA step MB": m_lora / 2**20,
                     "LoRA/full memory": m_lora / m_full})
    return rows


def big_rows(args):
    rows = []
    one_b = get_config("llama3_1b", remat="full")
    full = abstract_dpo_bytes(one_b, lora=None, pairs=args.big_pairs, seq=args.big_seq)
    bf16 = lora_lib.LoraConfig(**{**vars(LORA), "base_dtype": "bfloat16"})
    one_b_bf16 = get_config("llama3_1b", remat="full", dtype="bfloat16")
    for label, cfg, lora in (("full FT, frozen reference params (f32)", one_b, None),
                             ("LoRA r8 all targets, f32 base", one_b, LORA),
                             ("LoRA r8 all targets, bf16 base, f32 compute", one_b, bf16),
                             ("LoRA r8 all targets, bf16 base, bf16 compute", one_b_bf16, bf16)):
        b = full if lora is None else abstract_dpo_bytes(cfg, lora=lora, pairs=args.big_pairs,
                                                         seq=args.big_seq)
        rows.append({"what": f"DPO llama3_1b ({one_b.num_params / 1e9:.2f}B) {label}, "
                             f"{args.big_pairs} pairs x {args.big_seq}, remat full",
                     "compiled step GB / device": b / 2**30, "vs full FT": b / full})
    if not args.skip_8b:
        eight_b = get_config("llama3_8b", dtype="bfloat16", remat="full")
        meshes = [("1 device", None)]
        if len(jax.devices()) >= 8:
            meshes.append(("fsdp over 8", sharding.make_mesh(
                sharding.MeshSpec(data=1, fsdp=8), devices=jax.devices()[:8])))
        for where, mesh in meshes:
            # Under fsdp the batch is split too: one pair per device.
            pairs = args.big_pairs * (1 if mesh is None else mesh.size)
            b = abstract_dpo_bytes(eight_b, lora=bf16, pairs=pairs, seq=args.big_seq, mesh=mesh)
            rows.append({"what": f"DPO llama3_8b ({eight_b.num_params / 1e9:.2f}B) LoRA r8, "
                                 f"bf16 base and compute, {where}, {pairs} pairs x "
                                 f"{args.big_seq}, remat full",
                         "compiled step GB / device": b / 2**30, "vs full FT": float("nan")})
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8, help="SFT rows = DPO pairs")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--big-pairs", type=int, default=1)
    parser.add_argument("--big-seq", type=int, default=1024)
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args(argv)
    print(common.hardware())
    rows = [] if args.skip_cpu else cpu_rows(args, jax.devices("cpu")[0])
    if rows:
        print(common.table(rows))
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        one_b = get_config("llama3_1b", dtype="bfloat16", remat="dots")
        seq = 2048
        gpu = []
        for kind, b in (("sft", 8), ("dpo", 4)):
            batch = (_sft_batch if kind == "sft" else _dpo_batch)(one_b.vocab_size, b, seq, 256)
            t_full, m_full = measured(one_b, kind, batch, lora=None, iters=5, device=dev)
            lora = lora_lib.LoraConfig(**{**vars(LORA), "base_dtype": "bfloat16"})
            t_lora, m_lora = measured(one_b, kind, batch, lora=lora, iters=5, device=dev)
            tokens = b * seq * (2 if kind == "dpo" else 1)
            gpu.append({"what": f"{kind.upper()} llama3_1b bf16 {tokens} tok/step on "
                                f"{dev.device_kind}", "full s": t_full, "LoRA s": t_lora,
                        "LoRA/full time": t_lora / t_full, "full step MB": m_full / 2**20,
                        "LoRA step MB": m_lora / 2**20, "LoRA/full memory": m_lora / m_full})
        print(common.table(gpu))
        rows += gpu
    big = big_rows(args)
    print(common.table(big))
    common.save("bench_lora", rows + big)


if __name__ == "__main__":
    main()
