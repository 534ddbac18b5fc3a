"""What every run folder records: the gin config, the git commit, library versions, devices.

`write_run_info` is the one writer of run_info.json; the train loop adds its fields through it.
"""

import contextlib
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import jax

from align_jax import distributed


def _git_state() -> tuple[str | None, bool | None]:
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip() != ""
        return commit or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


_VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def run_info() -> dict[str, Any]:
    """Git commit, library versions and devices: the part of run_info.json every run shares."""
    commit, dirty = _git_state()
    devices = jax.devices()
    versions = {name: _version(name) for name in _VERSIONS}
    return {"time": datetime.datetime.now(datetime.UTC).isoformat(), "git_commit": commit,
            "git_dirty": dirty, "jax": versions["jax"], "jaxlib": versions["jaxlib"],
            "versions": versions, "python": platform.python_version(), "argv": sys.argv,
            "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                        "count": len(devices), "process_count": jax.process_count()}}


def write_run_info(workdir: str | os.PathLike, *, extra: Mapping[str, Any] | None = None,
                   operative_config: str | None = None, fresh: bool = False) -> dict[str, Any]:
    """The one writer of `<workdir>/run_info.json` (and, when given, `<workdir>/config.gin`).

    The shared fields (`run_info()`) are written anew; the run's own fields (`extra`, e.g. the
    train loop's resumed_from_step, mesh and model) are merged over those already in the file,
    so a later writer of the same run never drops an earlier one's fields.

    Args:
      workdir: the run's folder.
      extra: more JSON-able fields (the run's settings).
      operative_config: gin's operative config text, or None.
      fresh: start from nothing (a new run): fields of an earlier run in the folder go.
    Returns:
      the run_info dict written.
    """
    path = pathlib.Path(workdir) / "run_info.json"
    info: dict[str, Any] = {}
    if not fresh and path.exists():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
    info.update(run_info())
    info.update(dict(extra or {}))
    if not distributed.is_main():  # multi-process: process 0 writes the run's files
        return info
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, default=repr) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    if operative_config is not None:
        (path.parent / "config.gin").write_text(operative_config, encoding="utf-8")
    return info


def _write_gin(output_dir: str | os.PathLike, *, operative: bool) -> None:
    import gin  # local: the train package imports this module, and it runs without gin
    if not distributed.is_main():
        return
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "operative_config.gin" if operative else "config.gin"
    text = gin.operative_config_str() if operative else gin.config_str()
    (out / name).write_text(text)


@contextlib.contextmanager
def run_folder(output_dir: str | os.PathLike | None):
    """Writes config.gin and a fresh run_info.json on entry, operative_config.gin on a clean
    exit (run_info.json is left as the run's writers, e.g. the train loop, made it)."""
    if output_dir is None:
        yield None
        return
    _write_gin(output_dir, operative=False)
    write_run_info(output_dir, fresh=True)
    yield pathlib.Path(output_dir)
    _write_gin(output_dir, operative=True)
