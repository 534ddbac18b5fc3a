"""benchmarks/gpu.sh is known to run before a GPU session spends its minutes on it."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.sh")


def test_gpu_script_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (bash -n passed)")
    out = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_gpu_bench_imports_nothing_the_device_lacks():
    # The device machine has jax, flax, optax, orbax, numpy, torch, transformers only.
    code = ("import sys, runpy; sys.argv = ['x', 'report', '.']\n"
            "import benchmarks.gpu_bench as g\n"
            "import align_jax.models.transformer, align_jax.losses, align_jax.train.step\n"
            "import align_jax.train.compile, align_jax.generate.loop\n"
            "bad = {m.split('.')[0] for m in sys.modules} & {'gin', 'grain', 'datasets',"
            " 'tensorflow', 'sentencepiece', 'tokenizers', 'gguf'}\n"
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_gpu_script_smoke_runs_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               OUT_DIR=str(tmp_path), PYTHON=sys.executable)
    out = subprocess.run(["bash", SCRIPT, "--smoke"], env=env, capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    ok = [r for r in rows if "tokens_per_s" in r]
    # Every row but cuDNN (no GPU here) produced a number; both sides are present.
    assert {r["side"] for r in ok} == {"jax", "torch"} and len(ok) >= len(rows) - 1, rows
    assert "| greedy decode, batch 64 | jax |" in (tmp_path / "report.md").read_text()
