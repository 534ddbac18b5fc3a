"""The supported-version check: what it accepts, what it refuses, and setup.py agreeing with it."""

import importlib
import pathlib
import re
import warnings

import pytest
from packaging.requirements import Requirement

import align_jax
from align_jax import versions

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_installed_jax_is_supported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither an error nor an "untested" warning
        assert versions.check_jax() is None


# 0.12.0.1 and 0.12.1: the newest releases, tested by `make test-newest` (Colab resolves these).
@pytest.mark.parametrize("version", ["0.10.2", "0.11.2", "0.11.9rc1", "0.12.0.1", "0.12.1"])
def test_tested_range_passes(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert versions.check_jax(version, environ={}) is None


def test_old_jax_fails_naming_the_fix():
    with pytest.raises(versions.UnsupportedVersionError,
                       match=r"needs jax >= 0\.10\.2, found jax 0\.4\.35: pip install -U "
                             r"'jax>=0\.10\.2,<0\.13'"):
        versions.check_jax("0.4.35", environ={})


def test_newer_untested_jax_fails_unless_allowed():
    with pytest.raises(versions.UnsupportedVersionError, match="ALIGN_JAX_ALLOW_UNTESTED_JAX=1"):
        versions.check_jax("0.13.0", environ={})
    with pytest.warns(UserWarning, match="found jax 0.13.0"):
        versions.check_jax("0.13.0", environ={versions.ALLOW_UNTESTED: "1"})


def test_import_stops_on_an_unsupported_jax(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.4.1" if name == "jax" else real(name))
    try:
        with pytest.raises(versions.UnsupportedVersionError, match="found jax 0.4.1"):
            importlib.reload(align_jax)
    finally:
        monkeypatch.undo()
        importlib.reload(align_jax)


def test_setup_py_states_the_same_ranges():
    text = (ROOT / "setup.py").read_text()
    for package in versions.TESTED_RANGES:
        assert re.search(rf'"{re.escape(versions.requirement(package))}"', text), package


def test_installed_libraries_are_inside_setup_py_ranges():
    # What keeps a runtime's jax (e.g. Colab's newer one) when align_jax is pip-installed into
    # it: pip leaves an installed version that satisfies the requirement in place.
    for package in versions.TESTED_RANGES:
        installed = importlib.metadata.version(package)
        wanted = versions.requirement(package)
        assert Requirement(wanted).specifier.contains(installed, prereleases=True), (
            f"{package} {installed} is outside {wanted}")
