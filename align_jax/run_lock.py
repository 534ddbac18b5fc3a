"""One writer per run folder: `<run>/.lock` holds the writer's pid and host.

`run_lock(folder)` creates the lock file exclusively (O_EXCL) and removes it on exit. A lock
whose pid is dead on this host is stale (a killed run) and is taken over, saying so; a live
holder, or one on another host (which this host cannot check), makes the second writer refuse
with a one-line RunFolderBusyError naming the holder and the file.
"""

import contextlib
import json
import logging
import os
import socket
import time

from align_jax.atomic import pid_alive

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunFolderBusyError(RuntimeError):
    """Another live process holds the run folder's lock."""


def _read(path: str) -> dict | None:
    """The holder {"pid": int, "host": str, ...}; None when absent or of any other shape."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    # A list, a string pid, ...: as unreadable as garbage bytes (one warning, never a traceback).
    if not isinstance(holder, dict) or type(holder.get("pid")) is not int \
            or not isinstance(holder.get("host"), str):
        return None
    return holder


def acquire(folder: str | os.PathLike) -> str:
    """Takes the lock of `folder` (created if needed); returns the lock file's path."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                # Being written right now, or garbage left by a kill mid-write.
                time.sleep(0.2)
                holder = _read(path)
            if holder is not None and holder.get("pid") == os.getpid() and \
                    holder.get("host") == me["host"]:
                raise RunFolderBusyError(
                    f"{path}: this process already holds the run folder") from None
            same_host = holder is not None and holder.get("host") == me["host"]
            if holder is None or (same_host and not pid_alive(holder["pid"])):
                who = "unreadable" if holder is None else f"pid {holder.get('pid')}, not running"
                log.warning("%s: taking over a stale lock (%s)", path, who)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise RunFolderBusyError(
                f"{folder} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                f"(lock file {path}); wait for it, stop it, or use another output_dir "
                "(delete the lock file only if that process is gone)") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return path
    raise RunFolderBusyError(f"{path}: could not take the lock (another process keeps taking it)")


def release(path: str) -> None:
    holder = _read(path)
    if holder is not None and holder.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike | None):
    """Holds `folder`'s lock for the block (no-op for None)."""
    if folder is None:
        yield
        return
    path = acquire(folder)
    try:
        yield
    finally:
        release(path)
