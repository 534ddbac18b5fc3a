#!/usr/bin/env bash
# Runs align_jax on a Cloud TPU VM pod slice: every worker gets the same code and runs the same
# command (`--worker=all`); JAX finds its peers by itself on TPU VMs.
#
#   launch/tpu/pod.sh create            # the slice (skipped if it exists)
#   launch/tpu/pod.sh setup             # copy this checkout to every worker and install it
#   launch/tpu/pod.sh run configs/runs/value_alignment.gin [--gin_param=...]
#   launch/tpu/pod.sh logs [WORKER]     # follow a worker's log (default 0)
#   launch/tpu/pod.sh stop              # stop the run on every worker
#   launch/tpu/pod.sh delete            # delete the slice
#
# Settings come from the environment: TPU_NAME, ZONE, ACCELERATOR (e.g. v5p-32), RUNTIME (the
# TPU VM software version), PROJECT (optional), SPOT=1 for a spot/preemptible slice,
# COMMAND (align-jax subcommand, default run), OUTPUT (run folder, e.g. a gs:// path).
# The workers join through jax's coordinator on worker 0 (`align-jax --distributed`; jax finds
# worker 0 by itself): COORDINATOR_PORT (TCP port on worker 0, default 8476), INIT_TIMEOUT
# (seconds for every worker to join, default 300), HEARTBEAT_TIMEOUT (seconds before a silent
# worker counts as dead, default 100), COORDINATOR_ADDRESS (only to override jax's choice).
# DRY_RUN=1 prints each gcloud command instead of running it.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
COMMAND=${COMMAND:-run}
REMOTE_DIR=${REMOTE_DIR:-align_jax}
LOG=${LOG:-align_jax.log}
COORDINATOR_PORT=${COORDINATOR_PORT:-8476}
INIT_TIMEOUT=${INIT_TIMEOUT:-300}
HEARTBEAT_TIMEOUT=${HEARTBEAT_TIMEOUT:-100}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

gc() {
  local args=(gcloud compute tpus tpu-vm "$@" --zone="$ZONE")
  [[ -n "${PROJECT:-}" ]] && args+=(--project="$PROJECT")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%s ' "${args[@]}"; echo; else "${args[@]}"; fi
}

on_all() { gc ssh "$TPU_NAME" --worker=all --command="$1"; }

case "${1:-}" in
  create)
    if [[ "${DRY_RUN:-0}" != 1 ]] && gc describe "$TPU_NAME" >/dev/null 2>&1; then
      echo "$TPU_NAME exists in $ZONE; not creating it again"
      exit 0
    fi
    extra=()
    [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
    gc create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
    ;;
  setup)
    tarball=$(mktemp -d)/align_jax.tar.gz
    archive=(git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD)
    if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%s ' "${archive[@]}"; echo; else "${archive[@]}"; fi
    gc scp "$tarball" "$TPU_NAME:align_jax.tar.gz" --worker=all
    on_all "mkdir -p $REMOTE_DIR && tar -xzf align_jax.tar.gz -C $REMOTE_DIR && \
cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
.venv/bin/pip install -q -e . 'jax[tpu]'"
    ;;
  run)
    shift
    gin_file=${1:?usage: pod.sh run GIN_FILE [--gin_param=...]}
    shift
    params=""
    for p in "$@"; do params+=" $(printf '%q' "$p")"; done
    out=""
    [[ -n "${OUTPUT:-}" ]] && out=" --output_dir=$(printf '%q' "$OUTPUT")"
    settings="ALIGN_JAX_COORDINATOR_PORT=$COORDINATOR_PORT ALIGN_JAX_INIT_TIMEOUT=$INIT_TIMEOUT"
    settings+=" ALIGN_JAX_HEARTBEAT_TIMEOUT=$HEARTBEAT_TIMEOUT"
    [[ -n "${COORDINATOR_ADDRESS:-}" ]] && \
      settings+=" ALIGN_JAX_COORDINATOR_ADDRESS=$(printf '%q' "$COORDINATOR_ADDRESS")"
    # nohup + setsid: the run survives the ssh session; each worker logs to its own file.
    on_all "cd $REMOTE_DIR && $settings setsid nohup .venv/bin/align-jax $COMMAND --distributed \
--gin_file=$gin_file$params$out > ~/$LOG 2>&1 < /dev/null &"
    ;;
  logs)
    gc ssh "$TPU_NAME" --worker="${2:-0}" --command="tail -n 200 -f ~/$LOG"
    ;;
  stop)
    # SIGTERM: the trainer writes a checkpoint before it exits, as on preemption.
    on_all "pkill -TERM -f 'align-jax' || true"
    ;;
  delete)
    gc delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,24p' "$0"
    exit 2
    ;;
esac
