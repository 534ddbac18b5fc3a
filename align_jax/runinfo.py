"""What every run folder records: the gin config, the git commit, library versions, devices."""

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time


def _git_commit() -> str | None:
    try:
        root = pathlib.Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info() -> dict:
    """Git commit, library versions and devices, written into every run folder."""
    import flax
    import jax
    import jaxlib
    import optax
    return {"git_commit": _git_commit(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "python": sys.version.split()[0],
            "devices": [str(d) for d in jax.devices()], "argv": sys.argv,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_run_files(output_dir: str | os.PathLike, *, operative: bool) -> None:
    import gin

    from align_jax import distributed
    if not distributed.is_main():
        return
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "operative_config.gin" if operative else "config.gin"
    text = gin.operative_config_str() if operative else gin.config_str()
    (out / name).write_text(text)
    (out / "run_info.json").write_text(json.dumps(run_info(), indent=1) + "\n")


@contextlib.contextmanager
def run_folder(output_dir: str | os.PathLike | None):
    """Writes config.gin and run_info.json on entry, operative_config.gin on a clean exit."""
    if output_dir is None:
        yield None
        return
    write_run_files(output_dir, operative=False)
    yield pathlib.Path(output_dir)
    write_run_files(output_dir, operative=True)
