"""SmolLM2-135M-Instruct side by side (issue 28 item 3): align_jax vs torch/transformers.

The real model, float32, on the CPU, one thread on each side (XLA: no multi-threaded Eigen and
one intra-op thread; torch: `set_num_threads(1)`), each side in its own long-lived worker
process (this file with `--worker jax|torch`) that loads the model once and then times what
the parent asks for, one JSON line per request. The parent imports neither framework; it
alternates the two sides within each round (who goes first flips every round), so both see
the same load drift, and reports medians and the median of the per-round ratios.

  - train: one full fine-tuning step, SFT loss (completion tokens only: the last 3/4 of each
    row), AdamW (lr 1e-5, no weight decay, global-norm clip 1.0 on both sides), at B x T =
    4 x 128 and 8 x 512; align_jax's jitted `train_step` vs a torch loop over the
    transformers model with the same loss and optimizer. Random token ids (seeded, the
    same on both sides): the step's cost does not depend on the ids.
  - generate: greedy, EOS ignored, the same chat prompts (token ids encoded once by the
    align_jax worker and sent to both), the same number of new tokens, at batch 1, 4 and
    16; align_jax `generate` vs transformers `generate` (left padding, attention mask).
    Seconds of the whole call (prefill included); agreement of the greedy tokens.

Before the rounds of a case each side warms up unmeasured: generation runs the same call once
(compilation); training builds its state and compiles the step ahead of time (align_jax) or
runs one 1 x 16 step (torch: AdamW's moments allocated), so no full-size step is spent on
warm-up (at 8 x 512 on one loaded thread a step takes minutes).

Memory: both workers stay resident; at 8 x 512 the torch worker alone peaks above 10 GB (the
4,096 x 49,152 float32 logits, their log-softmax and gradients), so give it ~16 GB free.

    PYTHONPATH=. python -m benchmarks.bench_smollm2 [--train-shapes 4x128 8x512]
        [--train-rounds 3 1] [--gen-rounds 3] [--new 64] [--skip train|generate]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

MODEL = "smollm2-135m-instruct"
LR = 1e-5
TRAIN_SHAPES = ((4, 128), (8, 512))
BATCHES = (1, 4, 16)
QUESTIONS = [
    "Is honesty a value that matters at work?",
    "Should gifts from suppliers be reported to a manager?",
    "Is it fair to hide a small mistake from a customer?",
    "Do we treat everyone with respect, whatever their role?",
    "What should I do if a colleague takes credit for my work?",
    "Can I use company equipment for a personal project?",
    "How should a team handle a disagreement about safety?",
    "Is it acceptable to share a customer's data with a partner?",
    "Why does it matter to admit what you do not know?",
    "Should a manager listen to feedback from a new employee?",
    "What makes a promise to a client worth keeping?",
    "When is it right to report a rule being broken?",
    "How can a meeting make room for quieter people?",
    "Is a white lie to protect a friend's feelings wrong?",
    "What does fairness mean when giving out bonuses?",
    "How should we answer a question we are unsure about?",
]
ONE_THREAD_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
    "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false",
}


def sft_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    """A padded-free SFT batch [B, T] in numpy: loss on the targets after the first T/4 tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, size=(batch, seq), dtype=np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    mask = np.zeros((batch, seq), np.float32)
    mask[:, seq // 4 - 1:seq - 1] = 1.0  # position t scores token t + 1
    return {"tokens": tokens, "targets": targets, "loss_mask": mask,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32)}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of generated positions that agree before each row's first disagreement (after
    it the two contexts differ, so later tokens are not comparable)."""
    same = total = 0
    for x, y in zip(a, b):
        same += next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        total += len(x)
    return same / max(total, 1)


# -- the two workers ---------------------------------------------------------------------------

class _JaxSide:
    def __init__(self):
        import jax

        from align_jax.models.hf import load_hf
        from align_jax.models.named import resolve_model_path
        from align_jax.tokenizer import encode_prompt, load_tokenizer
        self.jax = jax
        self.versions = f"jax {jax.__version__}"
        path = resolve_model_path(MODEL)
        self.config, self.params = load_hf(path)
        tok = load_tokenizer(path)
        self.prompts = [encode_prompt(tok, q) for q in QUESTIONS]
        self.vocab = self.config.vocab_size
        self.train = {}

    def prepare_train(self, batch, seq):
        """Builds the state and compiles the step ahead of time (no step runs)."""
        from align_jax import sharding
        from align_jax.losses import objectives
        from align_jax.train import compile as compile_lib
        from align_jax.train import optim
        from align_jax.train import state as state_lib
        jax = self.jax
        self.train.clear()
        t = time.perf_counter()
        mesh = sharding.make_mesh(sharding.MeshSpec(data=1), devices=jax.devices()[:1])
        tx, schedule = optim.make_optimizer(
            optim.OptimizerConfig(learning_rate=LR, schedule="constant"), num_steps=1000)
        abstract = state_lib.abstract_state(
            jax.eval_shape(lambda p: p, self.params), tx=tx, with_ref=False)
        shardings = state_lib.train_state_shardings(abstract, mesh, "dp")
        params = jax.device_put(jax.tree.map(lambda x: x.copy(), self.params), shardings.params)
        state = compile_lib.init_train_state(params, tx=tx, seed=0, state_shardings=shardings)
        loss = objectives.get_objective("sft").bind(config=self.config, options=None)
        step = compile_lib.jit_train_step(loss=loss, tx=tx, schedule=schedule, grad_accum=1,
                                          mesh=mesh, rules="dp", state_shardings=shardings)
        b = jax.device_put(sft_batch(self.vocab, batch, seq),
                           compile_lib.batch_shardings(mesh, "dp"))
        with sharding.use_mesh(mesh, "dp"):
            compiled = step.jitted.lower(state, b).compile()
        self.train.update(state=state, compiled=compiled, batch=b, mesh=mesh)
        return time.perf_counter() - t, {}

    def train_step(self, batch, seq):
        from align_jax import sharding
        case = self.train
        assert case["batch"]["tokens"].shape == (batch, seq), "prepare_train first"
        t = time.perf_counter()
        with sharding.use_mesh(case["mesh"], "dp"):
            case["state"], metrics = case["compiled"](case["state"], case["batch"])
        loss = float(metrics["loss"])  # blocks until the step is done
        return time.perf_counter() - t, {"loss": loss}

    def generate(self, batch, new):
        from align_jax.generate import generate
        t = time.perf_counter()
        out = generate(self.config, self.params, self.prompts[:batch], max_new_tokens=new,
                       temperature=0.0, ignore_eos=True, batch_size=batch)
        return time.perf_counter() - t, {"tokens": out.tokens}

    def drop(self):
        self.train.clear()


class _TorchSide:
    def __init__(self, prompts):
        import torch
        import transformers

        from align_jax.models.named import resolve_model_path
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        transformers.utils.logging.disable_progress_bar()
        self.torch = torch
        self.versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
        path = resolve_model_path(MODEL)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa")
        self.prompts = prompts
        self.vocab = self.model.config.vocab_size
        self.pad = self.model.config.pad_token_id or 0
        self.batch = self.opt = None

    def _step(self, b):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=b["tokens"], use_cache=False).logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, b["targets"][..., None])[..., 0]
        loss = -(logp * b["loss_mask"]).sum() / b["loss_mask"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())

    def prepare_train(self, batch, seq):
        """Builds the batch and AdamW, then one step on a 1 x 16 slice (AdamW's moments
        allocated, autograd warm) so the timed steps do not pay for first use."""
        torch = self.torch
        t = time.perf_counter()
        self.batch = {k: torch.from_numpy(v) for k, v in sft_batch(self.vocab, batch, seq).items()
                      if k in ("tokens", "targets", "loss_mask")}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)
        self.model.train()
        self._step({k: v[:1, :16] for k, v in self.batch.items()})
        return time.perf_counter() - t, {}

    def train_step(self, batch, seq):
        assert tuple(self.batch["tokens"].shape) == (batch, seq), "prepare_train first"
        t = time.perf_counter()
        loss = self._step(self.batch)
        return time.perf_counter() - t, {"loss": loss}

    def generate(self, batch, new):
        torch = self.torch
        rows = self.prompts[:batch]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        self.model.eval()
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False,
                                      pad_token_id=self.pad, eos_token_id=None)
        dt = time.perf_counter() - t
        return dt, {"tokens": out[:, width:].tolist()}

    def drop(self):
        self.batch = self.opt = None  # the weights keep their few updates


def _worker(side: str) -> int:
    """Answers one JSON request a line on stdin with one JSON line; stdout carries nothing else."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints go to stderr
    obj = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "init":
            obj = _JaxSide() if side == "jax" else _TorchSide(req["prompts"])
            reply = {"prompts": getattr(obj, "prompts", None), "versions": obj.versions}
        elif op == "drop":
            obj.drop()
            reply = {}
        else:
            c0 = time.process_time()
            seconds, reply = getattr(obj, op)(**req)
            reply.update(seconds=seconds, cpu_seconds=time.process_time() - c0)
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
    return 0


# -- the parent --------------------------------------------------------------------------------

class _Worker:
    def __init__(self, side):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, **ONE_THREAD_ENV,
               "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.side = side
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_smollm2", "--worker", side], cwd=root,
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker exited (code {self.proc.wait()}); "
                               "its stderr is above")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _rounds(workers, rounds, *, warmup, **req):
    """Per side: the replies of `rounds` measured calls, alternating, after `warmup` (a
    request that prepares the case) or the same call once, unmeasured."""
    replies = {w.side: [] for w in workers}
    for w in workers:
        w.ask(**{**req, **warmup})
    for r in range(rounds):
        for w in (workers if r % 2 == 0 else workers[::-1]):
            replies[w.side].append(w.ask(**req))
    return replies


def _summary(replies):
    """Medians of wall and CPU seconds per side and of the per-round peer / align_jax ratios.

    With one thread a side, a process's CPU seconds count its own work only; on a loaded
    machine they scatter far less than wall seconds, so both ratios are reported.
    """
    out = {}
    for unit, key in (("s", "seconds"), ("CPU s", "cpu_seconds")):
        j = [r[key] for r in replies["jax"]]
        t = [r[key] for r in replies["torch"]]
        ratios = [b / a for a, b in zip(j, t)]
        out.update({f"align_jax {unit}": statistics.median(j),
                    f"torch {unit}": statistics.median(t),
                    f"torch/align_jax{'' if unit == 's' else ' (CPU)'}": statistics.median(ratios),
                    f"per-round ratios ({unit})": [round(x, 3) for x in ratios]})
    return out


def train_rows(workers, shapes, rounds_by_shape, record):
    for (batch, seq), rounds in zip(shapes, rounds_by_shape):
        replies = _rounds(workers, rounds, op="train_step", batch=batch, seq=seq,
                          warmup={"op": "prepare_train"})
        for w in workers:
            w.ask(op="drop")
        row = {"what": f"train SFT+AdamW {batch}x{seq}", "kind": "train", "batch": batch,
               "seq": seq, **_summary(replies), "rounds": rounds,
               "goal": "align_jax step <= torch step"}
        row["goal met"] = row["torch/align_jax"] >= 1.0
        record(row)


def generate_rows(workers, rounds, new, record):
    for batch in BATCHES:
        replies = _rounds(workers, rounds, op="generate", batch=batch, new=new, warmup={})
        jax_tokens, torch_tokens = replies["jax"][-1]["tokens"], replies["torch"][-1]["tokens"]
        row = {"what": f"generate greedy B={batch} new={new}", "kind": "generate",
               "batch": batch, "new": new, **_summary(replies), "rounds": rounds}
        row["align_jax tok/s"] = batch * new / row["align_jax s"]
        row["torch tok/s"] = batch * new / row["torch s"]
        row["same tokens (share)"] = agreement(jax_tokens, torch_tokens)
        row["rows identical"] = sum(a == b for a, b in zip(jax_tokens, torch_tokens))
        goal = batch == max(BATCHES)
        row["goal"] = "align_jax >= 2x transformers" if goal else ""
        row["goal met"] = row["torch/align_jax"] >= 2.0 if goal else ""
        record(row)


def _shape(text: str) -> tuple[int, int]:
    try:
        b, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--train-shapes: {text!r} is not BxT (e.g. 4x128)") from None
    return b, t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--train-shapes", nargs="+", type=_shape, default=list(TRAIN_SHAPES),
                    help="B x T of each train case, e.g. 4x128 8x512")
    ap.add_argument("--train-rounds", type=int, nargs="+", default=[3, 1],
                    help="measured rounds of each train shape")
    ap.add_argument("--gen-rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--skip", choices=("train", "generate"), default=None)
    ap.add_argument("--name", default="smollm2", help="writes results/<name>.json")
    args = ap.parse_args(argv)
    if len(args.train_rounds) != len(args.train_shapes):
        ap.error("--train-rounds: give one count per --train-shapes entry")
    if args.worker:
        return _worker(args.worker)
    from benchmarks import common
    load0 = os.getloadavg()
    jax_w = _Worker("jax")
    init = jax_w.ask(op="init")
    torch_w = _Worker("torch")
    versions = init["versions"] + ", " + torch_w.ask(op="init", prompts=init["prompts"])["versions"]
    workers = [jax_w, torch_w]
    machine = f"{_cpu_name()}, {os.cpu_count()} cores; {versions}"
    rows = []

    def record(row):  # saved after every case: a long run stopped early keeps what it measured
        load = os.getloadavg()
        row["load"] = f"{load0[0]:.1f} -> {load[0]:.1f}"
        rows.append(row)
        note = (f"SmolLM2-135M-Instruct f32, 1 thread per side, load average at the start "
                f"{load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, after the last case "
                f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on {os.cpu_count()} CPUs")
        common.save(args.name, rows, note=note, machine=machine)
        print(json.dumps(row), flush=True)

    try:
        if args.skip != "generate":
            generate_rows(workers, args.gen_rounds, args.new, record)
        if args.skip != "train":
            train_rows(workers, args.train_shapes, args.train_rounds, record)
    finally:
        for w in workers:
            w.close()
    for kind in ("generate", "train"):
        if any(r["kind"] == kind for r in rows):
            print(common.table([{k: v for k, v in r.items() if not k.startswith("per-round")}
                                for r in rows if r["kind"] == kind]))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
