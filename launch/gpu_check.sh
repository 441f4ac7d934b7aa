#!/usr/bin/env bash
# The one-call GPU check: full-size random-weight bf16 parity (Wan2.1-1.3B DiT vs diffusers,
# Qwen2.5-VL-3B vs transformers), one DiT forward at 13,200 tokens (ours with cuDNN vs diffusers:
# TFLOP/s and the fraction of the measured matmul rate), 8 x 256 caption tokens (ours vs
# transformers generate) and a 50-step CFG 352x640x33 generation, JSON to OUT. Under 8 minutes on
# one H100/H200 (vans_jax/apps/gpu_check.py says what it runs and what it leaves out).
#
#   launch/gpu_check.sh OUT.json              # on the GPU machine, from the repository root
#   launch/gpu_check.sh OUT.json --reduced    # tiny models, any backend (CPU: < 1 minute; a test runs it)
#   launch/gpu_check.sh --fetch-wheels        # HERE (with the package index): pure-Python packages the
#                                             # GPU image lacks (diffusers, ml_collections, ...) into .whl/
#
# Packages: the GPU machine has jax, flax, optax, torch, transformers, safetensors, pillow but not
# diffusers or ml_collections and no network. `--fetch-wheels` downloads them (and their missing
# needs) into .whl/ (ignored by git through .git/info/exclude); carry .whl with the call (the device
# tool's `carry: [".whl"]`): this script installs whatever is in .whl/ into /tmp/vans_site and puts
# it on PYTHONPATH before it starts, so nothing else is needed there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  mkdir -p .whl
  plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do plat+=(--platform "$p"); done
  # pure-Python wheels (py3-none-any) whatever python fetches them; versions of this environment where present
  pin() { "$PY" -c "import importlib.metadata as m, sys
try: print(sys.argv[1] + '==' + m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[1])" "$1"; }
  for pkg in diffusers ml_collections importlib_metadata; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
      "${plat[@]}" -d .whl "$(pin "$pkg")"
  done
  ls -la .whl
  exit 0
fi

OUT="${1:?usage: launch/gpu_check.sh OUT.json [--reduced] | --fetch-wheels}"
shift
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vans_site .whl/*.whl
  export PYTHONPATH="/tmp/vans_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
exec "$PY" -m vans_jax.apps.gpu_check --output "$OUT" "$@"
