#!/usr/bin/env bash
# Runs `vans-jax train` on EVERY worker of a Cloud TPU VM pod slice with one command
# (`gcloud compute tpus tpu-vm ssh --worker=all`). Each worker runs one JAX process driving its
# local chips; the processes find each other through the TPU metadata (VANS_DISTRIBUTED=auto ->
# jax.distributed.initialize() with JAX's cluster auto-detection).
#
#   TPU_NAME=vans-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --setup          # once: clone + install on all workers
#   TPU_NAME=vans-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config configs/vans.py --config.mesh.fsdp=-1 --config.mesh.data=1 \
#       --config.train.mode=sft_vlm --config.train.workdir=gs://BUCKET/runs/sft_vlm \
#       --config.vlm.path=/mnt/ckpt/Qwen2.5-VL-3B-Instruct ...
#
# Variables: TPU_NAME, ZONE (required); PROJECT; REPO_DIR (checkout on the workers, default
# ~/vans_jax); REPO_URL (for --setup); VENV (default $REPO_DIR/.venv); JAX_COMPILATION_CACHE_DIR
# (a gs:// path shares compiled programs between workers and runs); LIBTPU_INIT_ARGS (overrides
# the XLA:TPU flags below); DRY_RUN=1 prints the gcloud command instead of running it.
# The workdir (checkpoints, logs) must be storage every worker sees (gs://...): orbax writes
# multi-host checkpoints from all processes.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME (the TPU VM pod slice)}"
: "${ZONE:?set ZONE (the zone of the slice)}"
REMOTE_HOME_REPO='$HOME/vans_jax'           # expanded on the workers
REPO_DIR="${REPO_DIR:-$REMOTE_HOME_REPO}"
VENV="${VENV:-$REPO_DIR/.venv}"

if [[ "${1:-}" == "--setup" ]]; then
  : "${REPO_URL:?set REPO_URL (git URL of this repository) for --setup}"
  REMOTE="set -e; [ -d $REPO_DIR ] || git clone $(printf '%q' "$REPO_URL") $REPO_DIR; cd $REPO_DIR && git pull --ff-only;
python3 -m venv $VENV && . $VENV/bin/activate && pip install -q -U pip && pip install -q -e . 'jax[tpu]'"
else
  # XLA:TPU flags that matter for FSDP: run collectives asynchronously and overlap the all-gathers of
  # the next layer's parameters (and the gradient reduce-scatters) with compute.
  TPU_FLAGS="${LIBTPU_INIT_ARGS:---xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true}"
  ENV="export VANS_DISTRIBUTED=auto LIBTPU_INIT_ARGS=$(printf '%q' "$TPU_FLAGS") TPU_MIN_LOG_LEVEL=1 TPU_STDERR_LOG_LEVEL=1"
  if [[ -n "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
    ENV="$ENV JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$JAX_COMPILATION_CACHE_DIR")"
  fi
  REMOTE="cd $REPO_DIR && . $VENV/bin/activate && $ENV && exec vans-jax train $(printf '%q ' "$@")"
fi

CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE")
if [[ -n "${PROJECT:-}" ]]; then
  CMD+=(--project "$PROJECT")
fi
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${CMD[@]}"; echo
else
  exec "${CMD[@]}"
fi
