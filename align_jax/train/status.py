"""What a training run folder says about itself: its settings and how it ended.

`<run>/settings.json`  the train_main arguments that decide the result (written before the first
                       step). A rerun with the same settings resumes; with different ones it
                       refuses with a one-line diff unless `overwrite=True` clears the folder.
`<run>/status.json`    {"status": "running" | "completed" | "interrupted" | "failed", "step",
                       "num_steps", "message"}, rewritten atomically at each change.

Exit codes of `align-jax` (for schedulers that requeue on them): 0 completed, 1 failed,
2 bad command line or gin configuration, 75 (EX_TEMPFAIL) interrupted by SIGTERM or SIGINT (in
any command and phase, see `align_jax.interrupts`; training saves a checkpoint first): rerun the
same command to resume.
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from align_jax import interrupts
from align_jax.atomic import atomic_write_json

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 75

SETTINGS = "settings.json"
STATUS = "status.json"
# What a run folder's training wrote; `overwrite=True` removes exactly these.
RUN_ARTIFACTS = ("checkpoints", "checkpoints-corrupt", "metrics.jsonl", "tensorboard", "hf",
                 "peft", "train_summary.json", SETTINGS, STATUS, "cache", "model", "tokenizer",
                 "config.gin", "operative_config.gin", "run_info.json")


class RunInterrupted(Exception):
    """SIGTERM/SIGINT stopped training after a checkpoint was saved; rerun to resume."""

    exit_code = EXIT_INTERRUPTED


def sigterm_as_keyboard_interrupt():
    """SIGTERM or SIGINT inside the block raises `interrupts.Interrupted` (a
    KeyboardInterrupt), except inside the train loop and checkpoint saves, which act on it
    after the save; see `align_jax.interrupts`. The caller turns it into RunInterrupted."""
    return interrupts.honoured()


class SettingsChangedError(ValueError):
    """The run folder holds a run with other settings."""


def jsonable(value: Any) -> Any:
    """Settings as plain JSON values (dataclasses as dicts, tuples as lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs (nested keys dotted)."""
    a, b = _flat(dict(old)), _flat(dict(new))
    missing = object()
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}".replace(
        repr(missing), "(unset)") for k in sorted(set(a) | set(b)) if a.get(k, missing) !=
        b.get(k, missing)]


def read_json(path: str) -> dict | None:
    """The JSON object at `path`, None when absent; a corrupt file is a one-line ValueError."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it or rerun with --overwrite") from e
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out


def check_settings(output_dir: str, settings: Mapping[str, Any], *, overwrite: bool) -> bool:
    """Refuses to reuse a run folder whose settings differ; returns True when resuming.

    Writes nothing: call `record_settings` once the run is sure to start.
    """
    settings = json.loads(json.dumps(jsonable(settings)))
    path = os.path.join(output_dir, SETTINGS)
    old = read_json(path) if not overwrite else None
    if overwrite:
        clear_run(output_dir)
        return False
    if old is None:
        return os.path.isdir(os.path.join(output_dir, "checkpoints"))
    diff = settings_diff(old, settings)
    ckpt = os.path.join(output_dir, "checkpoints")
    if diff and not (os.path.isdir(ckpt) and os.listdir(ckpt)):
        return False  # nothing was trained yet (a start that failed): the new settings go
    if diff:
        raise SettingsChangedError(
            f"{output_dir} holds a run with other settings ({'; '.join(diff)}); use another "
            "output_dir, or pass --overwrite (entry.train_main.overwrite=True) to start over")
    return True


def record_settings(output_dir: str, settings: Mapping[str, Any]) -> None:
    atomic_write_json(os.path.join(output_dir, SETTINGS), jsonable(settings))


def clear_run(output_dir: str) -> list[str]:
    """Removes what an earlier training run wrote into `output_dir`; returns the names."""
    removed = []
    for name in RUN_ARTIFACTS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def write_status(output_dir: str, status: str, *, step: int | None, num_steps: int | None,
                 message: str | None = None) -> dict[str, Any]:
    record = {"status": status, "step": step, "num_steps": num_steps, "message": message}
    atomic_write_json(os.path.join(output_dir, STATUS), record)
    return record


def read_status(output_dir: str) -> dict | None:
    return read_json(os.path.join(output_dir, STATUS))
