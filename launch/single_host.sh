#!/usr/bin/env bash
# Usage: launch/single_host.sh demo --config configs/vans.py --config.vlm.path=/ckpt/Qwen2.5-VL-3B-Instruct
# XLA flags that matter on one GPU host: keep the allocator from grabbing everything when
# PyTorch references run beside JAX (benchmarks), and let XLA overlap collectives.
set -euo pipefail
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec vans-jax "$@"
