"""Train metrics: a JSONL file, TensorBoard event files, a progress bar, throughput and MFU.

TensorBoard events are written with tensorboardX (no TensorFlow needed). Weights & Biases and
MLflow get the same records when asked for (`ExternalLogging`) and installed; neither is a
dependency. Model FLOPs utilisation
is `tokens/s x config.flops_per_token(seq_len) / (devices x peak FLOP/s)`, reported only for
devices whose dense bf16 peak is known.
"""

import dataclasses
import importlib
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from align_jax.atomic import atomic_write
from align_jax.jsonl import JsonlError, decode_line, encode_line

# Dense bf16 peak FLOP/s per device (chip), by a substring of jax's `device_kind`. Longer keys
# are tried first, so "TPU v5 lite" (v5e) wins over "TPU v5" (v5p).
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of one device of this kind, or None when unknown (CPU)."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return PEAK_FLOPS[key]
    return None


def mfu(tokens_per_s: float, *, flops_per_token: float, num_devices: int,
        device_kind: str) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None for devices without a known peak."""
    peak = peak_flops(device_kind)
    if peak is None or num_devices <= 0:
        return None
    return tokens_per_s * flops_per_token / (num_devices * peak)


log = logging.getLogger(__name__)

# Optional metric writers besides metrics.jsonl and TensorBoard, by the module they need.
EXTERNAL_LOGGERS = ("wandb", "mlflow")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExternalLogging:
    """Where the metric records also go (each only when its package is installed).

    Attributes:
      names: any of EXTERNAL_LOGGERS.
      run_name: the run's name there (train_main: the output_dir's base name).
      config: the run's settings, recorded once at the start (W&B config, MLflow params).
    """
    names: tuple[str, ...] = ()
    run_name: str | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = [n for n in self.names if n not in EXTERNAL_LOGGERS]
        if unknown:
            raise ValueError(f"loggers: unknown logger {unknown[0]!r}; choose from "
                             f"{EXTERNAL_LOGGERS}")


class _Wandb:
    def __init__(self, module, spec: ExternalLogging, workdir: str):
        self._run = module.init(name=spec.run_name, config=dict(spec.config), dir=workdir)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        self._run.finish()


def _flat_params(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, Mapping) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flat_params(v, f"{prefix}{k}."))
        return out
    # MLflow keeps parameter values as strings of at most 500 characters (older servers).
    return {prefix.rstrip("."): str(tree)[:500]}


class _Mlflow:
    def __init__(self, module, spec: ExternalLogging, workdir: str):
        del workdir  # MLflow writes where its tracking URI says (MLFLOW_TRACKING_URI)
        self._mlflow = module
        module.start_run(run_name=spec.run_name)
        if spec.config:
            module.log_params(_flat_params(spec.config))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._mlflow.log_metrics(dict(values), step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def open_external(spec: ExternalLogging | None, workdir: str) -> list:
    """The writers of `spec` whose package imports; one warning line for each that does not."""
    writers = []
    for name in () if spec is None else spec.names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            log.warning("loggers: %r was asked for but is not installed (pip install %s); "
                        "metrics go to metrics.jsonl and TensorBoard only", name, name)
            continue
        writers.append({"wandb": _Wandb, "mlflow": _Mlflow}[name](module, spec, workdir))
    return writers


def _scalar(x: Any) -> float:
    return float(x)


def drop_records_after(path: str, step: int) -> int:
    """Removes records past `step` (and a torn last line) from a metrics file; returns how many.

    A run killed after logging step 57 resumes from its checkpoint at 50 and logs 51-57 again:
    the records after the checkpoint go, so every step appears once.
    """
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            record = decode_line(line, where=path)
        except JsonlError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        atomic_write(path, "".join(keep))
    return len(lines) - len(keep)


class MetricsLogger:
    """Writes one record per logged step and keeps the progress bar.

    Args:
      workdir: metrics go to `<workdir>/metrics.jsonl` (appended on resume) and
        `<workdir>/tensorboard/`.
      num_steps: the run length (for the bar's ETA).
      start_step: the step the run (re)starts from.
      log_every: write a record every this many steps (and on the last step).
      flops_per_token: for MFU; None to omit it.
      num_devices: devices the step runs on.
      device_kind: jax's device_kind of those devices.
      enabled: False on all but the main process.
      progress: show a tqdm bar.
      tensorboard: write TensorBoard event files.
      external: W&B / MLflow writers to send the same records to (`ExternalLogging`).
    """

    def __init__(self, workdir: str | os.PathLike, *, num_steps: int, start_step: int = 0,
                 log_every: int = 10, flops_per_token: float | None = None, num_devices: int = 1,
                 device_kind: str = "cpu", enabled: bool = True, progress: bool = True,
                 tensorboard: bool = True, external: ExternalLogging | None = None):
        self.log_every = max(int(log_every), 1)
        self.num_steps = num_steps
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.device_kind = device_kind
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._external: list = []
        self._window_tokens = 0
        self._window_start: float | None = None
        self._eval_loss: float | None = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        drop_records_after(path, start_step)
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            # Heavy (seconds to import): only the main process of a run writes TensorBoard.
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm.auto import tqdm  # local: `import align_jax.train` stays free of tqdm
            self._bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._external = open_external(external, os.fspath(workdir))

    def record(self, step: int, metrics: Mapping[str, Any], *, tokens: int) -> dict | None:
        """Accounts one finished step; on logging steps writes and returns its record.

        Args:
          step: the update count after this step (1 for the first update).
          metrics: host scalars from the step.
          tokens: tokens in this step's global batch.
        Returns:
          the record written, or None on steps that are not logged.
        """
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.update(1)
        if self._window_start is None:
            # The first step of a (re)started run includes compilation: time from its end.
            self._window_start = now
            self._window_tokens = 0
        else:
            self._window_tokens += tokens
        if step % self.log_every and step != self.num_steps:
            return None
        record = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        elapsed = now - self._window_start
        if self._window_tokens and elapsed > 0:
            rate = self._window_tokens / elapsed
            record["tokens_per_s"] = rate
            if self.flops_per_token is not None:
                util = mfu(rate, flops_per_token=self.flops_per_token,
                           num_devices=self.num_devices, device_kind=self.device_kind)
                if util is not None:
                    record["mfu"] = util
        self._window_start, self._window_tokens = now, 0
        record["time"] = time.time()
        if self.enabled:
            self._write(record)
        return record

    def _write(self, record: dict) -> None:
        self._jsonl.write(encode_line(record))
        self._jsonl.flush()
        step = record["step"]
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        values = {k: v for k, v in record.items() if k not in ("step", "time")}
        for writer in self._external:
            writer.log(step, values)
        if self._bar is not None:
            post = {"loss": f"{record['loss']:.4g}"}
            if "tokens_per_s" in record:
                post["tok/s"] = f"{record['tokens_per_s']:.4g}"
            if "mfu" in record:
                post["mfu"] = f"{100 * record['mfu']:.1f}%"
            if self._eval_loss is not None:
                post["eval_loss"] = f"{self._eval_loss:.4g}"
            self._bar.set_postfix(post, refresh=False)

    def record_eval(self, step: int, metrics: Mapping[str, Any], *,
                    note: str = "") -> dict | None:
        """Writes one evaluation's metrics as `eval/<name>` (metrics.jsonl, TensorBoard's
        eval/ section, the external writers) and a progress line; returns the record (None
        when disabled).

        Args:
          step: the updates done when the evaluation ran (0: before the first).
          metrics: host scalars, unprefixed.
          note: appended to the progress line (e.g. "best so far").
        """
        if not self.enabled:
            return None
        record = {"step": step, **{f"eval/{k}": _scalar(v) for k, v in metrics.items()},
                  "time": time.time()}
        self._jsonl.write(encode_line(record))
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        values = {k: v for k, v in record.items() if k not in ("step", "time")}
        for writer in self._external:  # W&B / MLflow: under the same eval/ names
            writer.log(step, values)
        shown = ", ".join(f"{k}={_scalar(v):.4g}" for k, v in metrics.items())
        self.write_line(f"eval step {step}: {shown}{f' ({note})' if note else ''}")
        if "loss" in metrics:
            self._eval_loss = _scalar(metrics["loss"])  # shown on the bar from now on
        return record

    def write_line(self, message: str) -> None:
        """Prints a message without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        for writer in self._external:
            writer.close()
        self._bar = self._tb = self._jsonl = None
        self._external = []
