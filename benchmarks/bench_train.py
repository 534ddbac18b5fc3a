"""Train step (issue 3): align_jax SFT and DPO vs TRL's SFTTrainer / DPOTrainer, same model, same
batch, one run; then the step's peak memory for SFT, DPO with precomputed reference log-probs and
DPO with frozen reference params.

Step time of the torch side is measured two ways: TRL's own trainers (the optimizer step timed
by a callback between on_step_begin and on_step_end, so it includes TRL's collator and metrics
work for that step; TRL's default activation checkpointing is turned off to match ours), and
a plain torch loop with the same losses written here, which isolates
the framework from the trainer. The reference log-probs of TRL's DPO are precomputed
(`precompute_ref_log_probs=True`) like ours, so neither side runs a reference forward per step.

Memory: XLA's buffer assignment of the compiled step (arguments + temporaries + outputs that
are not donated aliases) is exact for what the step itself holds; the peak RSS of a fresh
process per configuration (VmHWM) also counts the runtime, compilation and imports; the
reference log-probs are computed in the parent, so the DPO child holds only the policy step.
On a GPU, also a 1B-class config in bf16: tokens/s and MFU for SFT and DPO.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import numpy as np

from align_jax import sharding
from align_jax.losses import objectives, precompute_ref_logps
from align_jax.models import hf, transformer
from align_jax.models.config import get_config
from align_jax.train import compile as compile_lib
from align_jax.train import metrics as metrics_lib
from align_jax.train import optim
from align_jax.train import state as state_lib
from benchmarks import common

# ~4.6M parameters: big enough that the matmuls dominate, small enough for a loaded CPU.
CPU_CONFIG = dict(vocab_size=4096, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=64, mlp_dim=768)
BETA = 0.1
LR = 1e-5


def _config(name: str, **kw):
    if name == "cpu_5m":
        return get_config("small_20m", **CPU_CONFIG, **kw)
    return get_config(name, **kw)


# -- batches (numpy; the same numbers feed both frameworks) -------------------------------------

def _sft_batch(vocab, batch, seq, prompt_len, seed=0):
    """LM batch [B, T]: loss on the completion targets only (tokens after the prompt)."""
    rng = np.random.default_rng(seed)
    seq_BT = rng.integers(4, vocab, size=(batch, seq), dtype=np.int32)
    targets = np.concatenate([seq_BT[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    mask = np.zeros((batch, seq), np.float32)
    mask[:, prompt_len - 1:seq - 1] = 1.0  # position t scores token t+1
    return {"tokens": seq_BT, "targets": targets, "loss_mask": mask,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32)}


def _dpo_batch(vocab, batch, seq, prompt_len, seed=1):
    """Padded preference batch [B, 2, T]: one prompt, two different completions."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(4, vocab, size=(batch, 1, prompt_len), dtype=np.int32)
    comp = rng.integers(4, vocab, size=(batch, 2, seq - prompt_len), dtype=np.int32)
    seq_BPT = np.concatenate([np.repeat(prompt, 2, axis=1), comp], axis=2)
    flat = _sft_batch(vocab, batch * 2, seq, prompt_len)
    out = {k: v.reshape(batch, 2, seq) for k, v in flat.items()}
    out["tokens"] = seq_BPT
    out["targets"] = np.concatenate([seq_BPT[..., 1:], np.zeros((batch, 2, 1), np.int32)], -1)
    return out


# -- align_jax ---------------------------------------------------------------------------------

def _setup_jax(config, loss_fn, *, with_ref=False, loss_kwargs=None, device=None):
    device = device or jax.devices()[0]
    mesh = sharding.make_mesh(sharding.MeshSpec(data=1), devices=[device])
    rules = "dp"
    tx, schedule = optim.make_optimizer(optim.OptimizerConfig(learning_rate=LR), num_steps=1000)
    abstract = state_lib.abstract_state(transformer.abstract_params(config), tx=tx,
                                        with_ref=with_ref)
    shardings = state_lib.train_state_shardings(abstract, mesh, rules)
    params = transformer.init_params(config, jax.random.key(0), mesh=mesh, rules=rules)
    ref = jax.tree.map(lambda x: x.copy(), params) if with_ref else None
    state = compile_lib.init_train_state(params, tx=tx, seed=0, state_shardings=shardings,
                                         ref_params=ref)
    loss = objectives.get_objective(loss_fn).bind(config=config, options=loss_kwargs)
    step = compile_lib.jit_train_step(loss=loss, tx=tx, schedule=schedule, grad_accum=1,
                                      mesh=mesh, rules=rules, state_shardings=shardings)
    return state, step, mesh, rules


def _with_ref_logps(config, batch):
    """Adds batch["ref_logps"] from the initial params (the same init the policy starts from)."""
    params = transformer.init_params(config, jax.random.key(0))
    fn = jax.jit(lambda p, b: precompute_ref_logps(config, p, b))
    return {**batch, "ref_logps": np.asarray(fn(params, batch))}


def _step_memory_bytes(step, state, batch, mesh, rules):
    """XLA's planned bytes for one step: live arguments + temporaries + non-aliased outputs."""
    with sharding.use_mesh(mesh, rules):
        m = step.jitted.lower(state, batch).compile().memory_analysis()
    if m is None:
        return float("nan")
    return float(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes)


def _jax_case(config, kind, sft, dpo, ref_logps=None, device=None):
    """(state, step, placed batch, mesh, rules) for kind in sft | dpo | dpo_ref_params."""
    if kind == "sft":
        state, step, mesh, rules = _setup_jax(config, "sft", device=device)
        batch = sft
    elif kind == "dpo":
        state, step, mesh, rules = _setup_jax(config, "dpo", loss_kwargs={"beta": BETA},
                                              device=device)
        batch = (_with_ref_logps(config, dpo) if ref_logps is None
                 else {**dpo, "ref_logps": ref_logps})
    else:
        state, step, mesh, rules = _setup_jax(config, "dpo", with_ref=True,
                                              loss_kwargs={"beta": BETA}, device=device)
        batch = dpo
    batch = jax.device_put(batch, compile_lib.batch_shardings(mesh, rules))
    return state, step, batch, mesh, rules


def bench_jax(config, kind, sft, dpo, *, iters, ref_logps=None, device=None):
    """(median step seconds, XLA step bytes)."""
    state, step, batch, mesh, rules = _jax_case(config, kind, sft, dpo, ref_logps, device)
    mem = _step_memory_bytes(step, state, batch, mesh, rules)
    box = [state]

    def run():
        box[0], m = step(box[0], batch)
        jax.block_until_ready(m)

    return common.timeit(run, warmup=2, iters=iters), mem


# -- torch: the same losses written here -------------------------------------------------------

def _torch_model(config):
    import torch
    import transformers
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**hf.config_to_hf(config))
    model = transformers.AutoModelForCausalLM.from_config(hf_config).float()
    model.config._attn_implementation = "sdpa"
    return model


def _torch_token_logps(model, tokens, targets, mask):
    import torch
    logits = model(input_ids=tokens, use_cache=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    return logp * mask


def bench_torch(config, kind, sft, dpo, *, iters):
    import torch
    torch.set_num_threads(max(1, os.cpu_count()))
    model = _torch_model(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    if kind == "sft":
        b = {k: torch.from_numpy(np.asarray(sft[k])) for k in ("tokens", "targets", "loss_mask")}
    else:
        b = {k: torch.from_numpy(np.asarray(dpo[k])).flatten(0, 1)
             for k in ("tokens", "targets", "loss_mask")}
        with torch.no_grad():  # precomputed reference log-probs, from the initial weights
            ref = _torch_token_logps(model, b["tokens"], b["targets"], b["loss_mask"]).sum(-1)
        ref_c, ref_r = ref.view(-1, 2).unbind(-1)

    def run():
        opt.zero_grad(set_to_none=True)
        logp = _torch_token_logps(model, b["tokens"], b["targets"], b["loss_mask"])
        if kind == "sft":
            loss = -logp.sum() / b["loss_mask"].sum()
        else:
            pc, pr = logp.sum(-1).view(-1, 2).unbind(-1)  # chosen, rejected (one forward)
            loss = -torch.nn.functional.logsigmoid(BETA * ((pc - ref_c) - (pr - ref_r))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return common.timeit(run, warmup=2, iters=iters)


# -- TRL ---------------------------------------------------------------------------------------

def _trl_tokenizer(workdir):
    """A small tokenizer dir: TRL wants a processing class (pad/eos ids); our data is ids."""
    import transformers

    from align_jax.tokenizer_training import train_tokenizer
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "examples", "values_document.md"), encoding="utf-8") as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    train_tokenizer(lines, workdir, vocab_size=512)
    return transformers.AutoTokenizer.from_pretrained(workdir)


def bench_trl(config, kind, sft, dpo, *, iters, prompt_len):
    """Median seconds of TRL's optimizer step (or NaN and the reason when TRL is missing)."""
    try:
        import datasets
        import torch
        import transformers
        import trl
    except ImportError as e:
        return float("nan"), f"TRL not installed ({e.name})"
    torch.set_num_threads(max(1, os.cpu_count()))
    times, starts = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - starts[-1])

    warmup = 2
    datasets.disable_progress_bars()
    tqdm_env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference precompute bar
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tok = _trl_tokenizer(os.path.join(tmp, "tok"))
        common_args = dict(output_dir=os.path.join(tmp, "out"), max_steps=warmup + iters,
                           learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0,
                           lr_scheduler_type="constant", report_to="none", save_strategy="no",
                           logging_steps=10_000, use_cpu=True, dataloader_num_workers=0,
                           disable_tqdm=True, seed=0, bf16=False, fp16=False,
                           # TRL turns activation checkpointing on by default; ours is off.
                           gradient_checkpointing=False)
        model = _torch_model(config)
        if kind == "sft":
            n = len(sft["tokens"])
            rows = [{"input_ids": sft["tokens"][i].tolist(),
                     "completion_mask": [0] * prompt_len + [1] * (len(sft["tokens"][i])
                                                                   - prompt_len)}
                    for i in range(n)]
            args = trl.SFTConfig(per_device_train_batch_size=n, completion_only_loss=True,
                                 max_length=None, packing=False, **common_args)
            trainer = trl.SFTTrainer(model=model, args=args, processing_class=tok,
                                     train_dataset=datasets.Dataset.from_list(rows),
                                     callbacks=[Timer()])
        else:
            n = len(dpo["tokens"])
            rows = [{"prompt_ids": dpo["tokens"][i, 0, :prompt_len].tolist(),
                     "chosen_ids": dpo["tokens"][i, 0, prompt_len:].tolist(),
                     "rejected_ids": dpo["tokens"][i, 1, prompt_len:].tolist()}
                    for i in range(n)]
            args = trl.DPOConfig(per_device_train_batch_size=n, beta=BETA, loss_type=["sigmoid"],
                                 precompute_ref_log_probs=True, max_length=None,
                                 precompute_ref_batch_size=n, **common_args)
            trainer = _pretokenized_dpo_trainer(trl)(
                model=model, args=args, processing_class=tok,
                train_dataset=datasets.Dataset.from_list(rows), callbacks=[Timer()])
        with contextlib.redirect_stdout(io.StringIO()):  # TRL prints its own summary dict
            trainer.train()
    if tqdm_env is None:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = tqdm_env
    return float(np.median(times[warmup:])), f"TRL {trl.__version__}"


def _pretokenized_dpo_trainer(trl):
    class PretokenizedDPOTrainer(trl.DPOTrainer):
        """DPOTrainer on rows that already hold prompt_ids / chosen_ids / rejected_ids.

        TRL's DPO always tokenizes text; skipping that keeps the token ids identical to ours.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


# -- peak RSS per configuration, each in a fresh process ---------------------------------------

def _hwm_kb() -> int:
    """This process's peak RSS in KiB.

    VmHWM rather than getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child
    forked from a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_child(kind, config_name, batch, seq, prompt_len, steps, ref_file):
    config = _config(config_name)
    sft = _sft_batch(config.vocab_size, batch, seq, prompt_len)
    dpo = _dpo_batch(config.vocab_size, batch, seq, prompt_len)
    ref = np.load(ref_file) if ref_file else None
    before = _hwm_kb()
    state, step, b, _, _ = _jax_case(config, kind, sft, dpo, ref)
    for _ in range(steps):
        state, m = step(state, b)
        jax.block_until_ready(m)
    print(json.dumps({"before_kb": before, "peak_kb": _hwm_kb()}))


def rss_mb(kind, args, ref_logps):
    """(peak RSS MB, MB above the peak after imports) of a fresh process running 3 steps."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    with tempfile.TemporaryDirectory() as tmp:
        ref_file = os.path.join(tmp, "ref_logps.npy")
        np.save(ref_file, ref_logps)
        cmd = [sys.executable, "-m", "benchmarks.bench_train", "--rss-child", kind,
               "--config", args.config, "--batch", str(args.batch), "--seq", str(args.seq),
               "--prompt-len", str(args.prompt_len), "--ref-file", ref_file]
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                             check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak_kb"] / 1024, (r["peak_kb"] - r["before_kb"]) / 1024


# -- GPU: a 1B-class config in bf16 ------------------------------------------------------------

def gpu_rows(dev):
    big = get_config("llama3_1b", dtype="bfloat16", remat="dots")
    seq = 2048
    rows = []
    for kind, b in (("sft", 8), ("dpo", 4)):
        sft = _sft_batch(big.vocab_size, b, seq, 256)
        dpo = _dpo_batch(big.vocab_size, b, seq, 256)
        t, mem = bench_jax(big, kind, sft, dpo, iters=5)
        tokens = b * seq * (2 if kind == "dpo" else 1)
        tps = tokens / t
        mfu = metrics_lib.mfu(tps, flops_per_token=big.flops_per_token(seq), num_devices=1,
                              device_kind=dev.device_kind)
        rows.append({"what": f"{kind.upper()} llama3_1b bf16 {tokens} tok/step on "
                             f"{dev.device_kind}",
                     "step s": t, "tok/s": tps, "mfu": float("nan") if mfu is None else mfu,
                     "XLA step GB": mem / 2**30})
    return rows


def cpu_rows(args, cpu):
    """The side-by-side step-time rows and the memory rows."""
    config = _config(args.config)
    sft = _sft_batch(config.vocab_size, args.batch, args.seq, args.prompt_len)
    dpo = _dpo_batch(config.vocab_size, args.batch, args.seq, args.prompt_len)
    shape = f"{args.config} ({config.num_params / 1e6:.1f}M) B={args.batch} T={args.seq} f32"
    rows, mem_rows = [], []
    mem = {}
    ref_logps = np.asarray(_with_ref_logps(config, dpo)["ref_logps"])
    for kind in ("sft", "dpo"):
        t_jax, mem[kind] = bench_jax(config, kind, sft, dpo, iters=args.iters,
                                     ref_logps=ref_logps, device=cpu)
        t_torch = bench_torch(config, kind, sft, dpo, iters=args.iters)
        if args.no_trl:
            t_trl, trl_note = float("nan"), "skipped (--no-trl)"
        else:
            t_trl, trl_note = bench_trl(config, kind, sft, dpo, iters=args.iters,
                                        prompt_len=args.prompt_len)
        tokens = args.batch * args.seq * (2 if kind == "dpo" else 1)
        rows.append({"what": f"{kind.upper()} step {shape}"
                             + (", precomputed ref logps" if kind == "dpo" else ""),
                     "align_jax s": t_jax, "torch loop s": t_torch, "TRL s": t_trl,
                     "torch/align_jax": t_torch / t_jax, "TRL/align_jax": t_trl / t_jax,
                     "align_jax tok/s": tokens / t_jax, "TRL": trl_note})
    t_ref, mem["dpo_ref_params"] = bench_jax(config, "dpo_ref_params", sft, dpo,
                                             iters=args.iters, device=cpu)
    rows.append({"what": f"DPO step {shape}, frozen ref params (reference forward each step)",
                 "align_jax s": t_ref, "torch loop s": float("nan"), "TRL s": float("nan"),
                 "torch/align_jax": float("nan"), "TRL/align_jax": float("nan"),
                 "align_jax tok/s": 2 * args.batch * args.seq / t_ref, "TRL": "not run"})
    for kind, label in (("sft", "SFT"), ("dpo", "DPO, precomputed ref logps"),
                        ("dpo_ref_params", "DPO, frozen ref params")):
        row = {"what": f"peak memory {label}", "XLA step MB": mem[kind] / 2**20,
               "vs SFT": mem[kind] / mem["sft"]}
        if not args.no_rss:
            peak, growth = rss_mb(kind, args, ref_logps)
            row.update({"process peak RSS MB": peak, "RSS growth after imports MB": growth})
        mem_rows.append(row)
    return rows, mem_rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="cpu_5m", help="a preset name or cpu_5m")
    parser.add_argument("--batch", type=int, default=8, help="SFT rows = DPO pairs")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ref-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        return _rss_child(args.rss_child, args.config, args.batch, args.seq, args.prompt_len, 3,
                          args.ref_file if args.rss_child == "dpo" else None)
    # The side-by-side runs on the CPU (torch here is a CPU build), also on a GPU machine.
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        rows, mem_rows = cpu_rows(args, cpu)
    dev = jax.devices()[0]
    gpu = gpu_rows(dev) if dev.platform == "gpu" else []
    print(common.table(rows))
    print()
    print(common.table(mem_rows))
    if gpu:
        print()
        print(common.table(gpu))
    common.save("train", rows + mem_rows + gpu)


if __name__ == "__main__":
    main()
