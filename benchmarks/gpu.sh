#!/usr/bin/env bash
# Issue 14's GPU figures, align_jax next to torch eager on the same device, in one run:
# SFT and DPO steps of llama3_1b (8 x 2048 tokens, bf16 compute) under several attention and
# remat settings, greedy decode at batch 1 and 64, and (issue 11) greedy answers with and
# without 3 held-out answers scored from their prefill, batch 64. Each measurement runs in its own
# process (JAX and torch never share one); the table goes to $OUT_DIR/report.md.
#   bash benchmarks/gpu.sh            # the device run (< 6 minutes on an H200 before
#                                     # jax-score was added; not yet run with it)
#   bash benchmarks/gpu.sh --smoke    # tiny model and shapes: checks the script on a CPU
# Needs only jax, flax, optax, orbax, numpy, torch and transformers.
set -euo pipefail

SMOKE=()
if [[ "${1:-}" == "--smoke" ]]; then
  SMOKE=(--smoke)
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/gpu_results}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results.jsonl"
: > "$RESULTS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

bench() {
  # One measurement; a crash is recorded by gpu_bench.py itself, a hard kill is noted here.
  if ! "$PYTHON" "$ROOT/benchmarks/gpu_bench.py" "$1" "$RESULTS" "${SMOKE[@]}" "${@:2}"; then
    echo "gpu.sh: $* exited with an error" >&2
  fi
}

start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } \
  > "$OUT_DIR/device.txt" 2>/dev/null
"$PYTHON" -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', \
flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, \
jax.devices()[0].device_kind)" >> "$OUT_DIR/device.txt"

bench torch-train --method sft
bench torch-train --method dpo
bench torch-decode --batch 1
bench torch-decode --batch 64
bench jax-train --method sft --attention auto --remat full
bench jax-train --method sft --attention auto --remat attn_mlp
bench jax-train --method sft --attention cudnn --remat dots
bench jax-train --method sft --attention auto --remat none
bench jax-train --method dpo --attention auto --remat none
bench jax-decode --batch 1
bench jax-decode --batch 64
bench jax-score --batch 64
if [[ "${WITH_XLA:-0}" == 1 ]]; then
  # The old default (fails to compile at 8 x 2048 on an H200: scores kept for every layer).
  bench jax-train --method sft --attention xla --remat dots
fi

"$PYTHON" "$ROOT/benchmarks/gpu_bench.py" report "$OUT_DIR" > "$OUT_DIR/report.md"
{ echo; echo "$(date -u +%F) $(head -c 200 "$OUT_DIR/device.txt" | tr '\n' ' ')"
  echo "total $(( $(date +%s) - start )) s"; } >> "$OUT_DIR/report.md"
cat "$OUT_DIR/report.md"
