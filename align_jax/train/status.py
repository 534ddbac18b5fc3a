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
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from align_jax import interrupts
from align_jax.atomic import atomic_write_json
from align_jax.data.sources import DataError, mixture_parts, parse_hf_spec

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 75

SETTINGS = "settings.json"
STATUS = "status.json"
# The key of settings.json holding the training data's content identity (`data_identity`).
DATA_FILES = "data_files"
# The key of settings.json holding the path settings relative to the run folder: a folder
# moved or copied together with its data and base model still resumes.
RELATIVE_PATHS = "relative_paths"
PATH_SETTINGS = ("data", "init_from", "tokenizer")
# An export of an earlier end of the run, set aside when a continuation starts (hf_step_400).
STALE_EXPORT_PREFIXES = ("hf_step_", "peft_step_")
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


def check_settings(output_dir: str, settings: Mapping[str, Any], *, overwrite: bool,
                   data_files: Mapping[str, Any] | None = None) -> bool:
    """Refuses to reuse a run folder whose settings or data differ; returns True when resuming.

    Writes nothing but what `overwrite` clears: call `record_settings` once the run is sure to
    start.

    Args:
      output_dir: the run folder.
      settings: the arguments that decide the result.
      overwrite: clear what an earlier run wrote (refused on a folder that holds no run).
      data_files: `data_identity` of the training data; a resume on changed data is refused.
    """
    settings = json.loads(json.dumps(jsonable(settings)))
    if overwrite:
        clear_run(output_dir)
        return False
    old = read_json(os.path.join(output_dir, SETTINGS))
    steps = checkpoint_steps(output_dir)
    if old is None:
        if steps:
            raise SettingsChangedError(
                f"{output_dir} has checkpoints (step {max(steps)}) but no {SETTINGS}: what they "
                "were trained with is unknown; pass --overwrite (entry.train_main.overwrite=True)"
                " to start over, or use another output_dir")
        return False
    old_files = old.pop(DATA_FILES, None)
    old_paths = old.pop(RELATIVE_PATHS, None) or {}
    new_paths = relative_paths(output_dir, settings)
    for key, rel in new_paths.items():
        if old_paths.get(key) == rel and key in old:
            old[key] = settings[key]  # the same file seen from a moved or copied folder
    diff = settings_diff(old, settings)
    if not steps:
        return False  # nothing was trained yet (a start that failed): the new settings go
    if diff:
        raise SettingsChangedError(
            f"{output_dir} holds a run with other settings ({'; '.join(diff)}); use another "
            "output_dir, or pass --overwrite (entry.train_main.overwrite=True) to start over")
    changed = data_changes(old_files, data_files)
    if changed:
        raise SettingsChangedError(
            f"{changed}: the training data changed since this run's checkpoints were trained "
            f"on it (up to step {max(steps)}); restore it, use another output_dir, or pass "
            "--overwrite (entry.train_main.overwrite=True) to start over")
    return True


def relative_paths(output_dir: str, settings: Mapping[str, Any]) -> dict[str, str]:
    """The local-path settings (data, init_from, tokenizer; "hf:"/"train:" prefixes kept) as
    paths relative to the run folder."""
    out = {}
    for key in PATH_SETTINGS:
        value = settings.get(key)
        if not isinstance(value, str):
            continue
        prefix = next((p for p in ("hf:", "train:") if value.startswith(p)), "")
        path = value[len(prefix):]
        if path and os.path.exists(path):
            out[key] = prefix + os.path.relpath(os.path.abspath(path),
                                                os.path.abspath(output_dir))
    return out


def checkpoint_steps(output_dir: str) -> list[int]:
    """The steps of the checkpoint folders of the run (checkpoints/<step>), sorted."""
    path = os.path.join(output_dir, "checkpoints")
    names = os.listdir(path) if os.path.isdir(path) else []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def _local_data_root(spec: Any) -> str | None:
    if not isinstance(spec, (str, os.PathLike)):
        return None
    spec = os.fspath(spec)
    if spec.startswith("hf:"):
        try:
            spec = parse_hf_spec(spec).name
        except DataError:
            return None
    return spec if os.path.exists(spec) else None


def data_identity(spec: Any) -> dict[str, Any] | None:
    """Content identity of the local files a data spec reads ({name: {size, sha256}}, names
    relative to the spec's file or folder; absolute for a mixture's parts), or None when it
    reads none (a hub dataset)."""
    parts = mixture_parts(spec)
    if parts is not None:
        files = {}
        for part, _ in parts:
            one = data_identity(part)
            if one is not None:
                root = one["path"]
                files.update({root if name == os.path.basename(root) else
                              os.path.join(root, name): v for name, v in one["files"].items()})
        return {"path": "", "files": files} if files else None
    root = _local_data_root(spec)
    if root is None:
        return None
    if os.path.isfile(root):
        files = {os.path.basename(root): root}
    else:
        files = {os.path.relpath(os.path.join(d, n), root): os.path.join(d, n)
                 for d, _, names in os.walk(root) for n in names}
    out = {"path": os.path.abspath(root), "files": {}}
    for name, path in sorted(files.items()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out["files"][name] = {"size": os.path.getsize(path), "sha256": digest.hexdigest()}
    return out


def data_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> str | None:
    """The first data file whose content differs between two `data_identity`s (its path), or
    None (also when either side is unknown)."""
    if not old or not new:
        return None
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for name in sorted(set(old_files) | set(new_files)):
        if old_files.get(name) != new_files.get(name):
            where = "added" if name not in old_files else (
                "removed" if name not in new_files else "content differs")
            path = new["path"] if name == os.path.basename(new["path"]) else os.path.join(
                new["path"], name)
            return f"{path} ({where})"
    return None


def record_settings(output_dir: str, settings: Mapping[str, Any]) -> None:
    atomic_write_json(os.path.join(output_dir, SETTINGS), jsonable(settings))


def clear_run(output_dir: str) -> list[str]:
    """Removes what an earlier training run wrote into `output_dir`; returns the names.

    A folder that holds no run (no settings.json, status.json or checkpoints/<step>) is
    refused, naming what would have gone: those files are the user's, not a run's.
    """
    present = [n for n in RUN_ARTIFACTS if os.path.lexists(os.path.join(output_dir, n))]
    present += sorted(n for n in (os.listdir(output_dir) if os.path.isdir(output_dir) else ())
                      if n.startswith(STALE_EXPORT_PREFIXES))
    is_run = any(os.path.isfile(os.path.join(output_dir, n)) for n in (SETTINGS, STATUS)) \
        or checkpoint_steps(output_dir)
    if present and not is_run:
        raise ValueError(
            f"{output_dir}: --overwrite would delete {', '.join(present)}, but the folder holds "
            f"no training run (no {SETTINGS}, {STATUS} or checkpoints/<step>); move them "
            "away or use another output_dir")
    removed = []
    for name in present:
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
