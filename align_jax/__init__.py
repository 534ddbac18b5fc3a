"""align_jax: align a language model to the values in unstructured text, on one JAX engine.

Public API (stable names; see README.md):
  align_jax.models.load_hf / save_hf / init_params / forward
  align_jax.tokenizer.load_tokenizer
  align_jax.generate.generate
  align_jax.losses.sequence_logps / dpo_loss / sami_loss
  align_jax.eval.mi_lower_bound

Submodules load on first attribute access, so `import align_jax` stays cheap.
"""

import importlib

from align_jax import versions as _versions

__version__ = "0.1.0"

# Reads jax's installed version without importing jax; stops on one outside the tested range.
_versions.check_jax()

_SUBMODULES = ("axes", "distributed", "versions", "sharding", "models", "tokenizer", "data",
               "losses", "train", "generate", "sdg", "methods", "eval", "cli")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"align_jax.{name}")
    raise AttributeError(f"module 'align_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
