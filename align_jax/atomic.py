"""Atomic writes: a file or folder a later step reads is either complete or absent.

`atomic_write(path, text)` writes a sibling temp file and renames it over `path` (one rename,
atomic on POSIX). `atomic_dir(path)` yields a sibling temp folder; when the block finishes it
replaces `path` (an existing folder is renamed aside first and removed after the swap), and on
an exception, or when `commit` is set False, the temp folder is deleted and `path` is untouched.
A process killed mid-write leaves only a `.<name>.tmp-<pid>` sibling, removed by the next
writer once that pid is gone.
"""

import contextlib
import json
import os
import shutil
import socket
from typing import Any

_TMP = ".{name}.tmp-{host}-{pid}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (stale temp files and locks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(path: str) -> None:
    """Removes temp siblings of `path` left by dead processes of this host."""
    parent, name = os.path.split(path)
    prefix = f".{name}.tmp-{socket.gethostname()}-"
    try:
        entries = os.listdir(parent or ".")
    except FileNotFoundError:
        return
    for entry in sorted(entries, key=lambda e: not e.endswith(".old")):
        if entry.startswith(prefix) and entry[len(prefix):].split(".")[0].isdigit():
            if not pid_alive(int(entry[len(prefix):].split(".")[0])):
                stale = os.path.join(parent, entry)
                if entry.endswith(".old") and not os.path.lexists(path):
                    # Killed between the two renames of `replace_dir`: the old folder returns.
                    os.rename(stale, path)
                    continue
                if os.path.isdir(stale):
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(stale)


def _tmp_name(path: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, _TMP.format(name=name, host=socket.gethostname(),
                                            pid=os.getpid()))


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no read-only query elsewhere: set and restore
    os.umask(mask)
    return mask


def default_mode(path: str | os.PathLike) -> None:
    """Gives `path` the mode a plain open() would have (0o666 less the umask).

    Writers that go through a private temp file (safetensors' save_file) leave 0600, so an
    export's weights were unreadable to the group that reads its config.json.
    """
    os.chmod(path, 0o666 & ~_umask())


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the whole new one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_name(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1, **kwargs) -> None:
    """`atomic_write` of `obj` as JSON (with a final newline)."""
    atomic_write(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


class _Staging:
    """The temp folder of an `atomic_dir` block; set `commit = False` to discard it."""

    def __init__(self, path: str):
        self.path = path
        self.commit = True

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yields a staging folder (`os.fspath` of it is the path) that replaces `path` on success.

    Usage: `with atomic_dir(out) as tmp: write_files(os.fspath(tmp))`. An exception inside the
    block, or `tmp.commit = False`, removes the staging folder and leaves `path` as it was.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _clean_stale(path)
    staging = _Staging(_tmp_name(path))
    if os.path.exists(staging.path):
        shutil.rmtree(staging.path)
    os.makedirs(staging.path)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    if not staging.commit:
        shutil.rmtree(staging.path, ignore_errors=True)
        return
    replace_dir(staging.path, path)


def replace_dir(src: str, dst: str) -> None:
    """Moves the finished folder `src` to `dst`, replacing a folder there (two renames)."""
    if os.path.lexists(dst):
        old = _tmp_name(dst) + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
