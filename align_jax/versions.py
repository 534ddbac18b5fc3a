"""The library versions align_jax is tested with, and the check run when it is imported.

setup.py states the same ranges (a test compares them). A jax outside its range stops the
import with a message saying what to install; ALIGN_JAX_ALLOW_UNTESTED_JAX=1 turns that into a
warning for a newer, untested jax (e.g. the one a fresh Colab runtime resolves).
"""

import importlib.metadata
import os
import re
import warnings

# package: (lowest tested, first untested), as in setup.py.
TESTED_RANGES: dict[str, tuple[str, str]] = {
    "jax": ("0.10.2", "0.13"),
    "flax": ("0.12.8", "0.13"),
    "optax": ("0.2.8", "0.3"),
    "orbax-checkpoint": ("0.12.4", "0.13"),
    "grain": ("0.2.18", "0.3"),
    "transformers": ("5.17", "6"),
}
# Where each combination ran (README's table says the same).
TESTED_ON = (
    "CPU (the test suite, Python 3.11): jax 0.10.2, flax 0.12.8, optax 0.2.8, "
    "orbax-checkpoint 0.12.8, grain 0.2.18, transformers 5.25",
    "CPU (make test-newest, Python 3.12): jax 0.12.1, flax 0.12.12, optax 0.2.8, "
    "orbax-checkpoint 0.12.8, grain 0.2.18, transformers 5.25",
    "NVIDIA H200: jax 0.11.2, flax 0.12.10, orbax-checkpoint 0.12.4, transformers 5.17",
)
ALLOW_UNTESTED = "ALIGN_JAX_ALLOW_UNTESTED_JAX"


class UnsupportedVersionError(ImportError):
    """An installed library outside the range align_jax supports."""


def _parse(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string; pre-release tails are ignored."""
    match = re.match(r"(\d+(?:\.\d+)*)", version.strip())
    if match is None:
        raise ValueError(f"unreadable version {version!r}")
    parts = tuple(int(p) for p in match.group(1).split("."))
    return (parts + (0, 0, 0))[:3]


def requirement(package: str) -> str:
    """The pip requirement of `package`'s tested range, e.g. "jax>=0.10.2,<0.13"."""
    low, high = TESTED_RANGES[package]
    return f"{package}>={low},<{high}"


def check_jax(version: str | None = None, *, environ=None) -> None:
    """Raises when jax `version` (default: the installed one) is outside the tested range.

    Args:
      version: a jax version string; None reads the installed package's (jax is not imported).
      environ: the environment (default os.environ), for ALIGN_JAX_ALLOW_UNTESTED_JAX.
    Raises:
      UnsupportedVersionError: older than the lowest tested jax, or newer than the tested range
        without ALIGN_JAX_ALLOW_UNTESTED_JAX=1.
    """
    environ = os.environ if environ is None else environ
    if version is None:
        try:
            version = importlib.metadata.version("jax")
        except importlib.metadata.PackageNotFoundError:
            raise UnsupportedVersionError(
                f"align_jax needs jax: pip install '{requirement('jax')}'") from None
    low, high = TESTED_RANGES["jax"]
    found = _parse(version)
    tested = "; ".join(TESTED_ON)
    if found < _parse(low):
        raise UnsupportedVersionError(
            f"align_jax needs jax >= {low}, found jax {version}: pip install -U "
            f"'{requirement('jax')}' (tested: {tested})")
    if found >= _parse(high):
        message = (f"align_jax is tested with jax >= {low}, < {high}; found jax {version} "
                   f"(tested: {tested})")
        if environ.get(ALLOW_UNTESTED) == "1":
            warnings.warn(f"{message}; running anyway ({ALLOW_UNTESTED}=1)", stacklevel=2)
            return
        raise UnsupportedVersionError(
            f"{message}. Install a tested one (pip install '{requirement('jax')}') or set "
            f"{ALLOW_UNTESTED}=1 to try this one")
