#!/usr/bin/env bash
# The GPU check: one script, <= 8 minutes on one H100/H200-class GPU, everything it measured under one folder.
#
#   bash bench/gpu.sh [OUT]             # on a CUDA machine (OUT defaults to bench-gpu/)
#   bash bench/gpu.sh --dry-run [OUT]   # anywhere: tiny sizes on the CPU, so CI keeps the script working
#
# On the lent device machine the image has torch and timm but not deepspeed, mlflow or dvc: carry wheels in .whl/
# (see the device tool's README) and this script installs them into /tmp/site first.
# Writes OUT/gpu-tests.log (pytest -m gpu), OUT/gpu.json and OUT/gpu.log (bench/gpu.py: train stage vs a bare timm
# loop at 224 px bf16 channels_last, loader img/s per worker, benchmark stage vs a plain inference loop).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=""
if [ "${1:-}" = "--dry-run" ]; then dry="--dry-run"; shift; fi
out="${1:-bench-gpu}"
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" || exit 1
fi
export PYTHONPATH="$PWD:$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 RSB_TRACKING=off
status=0
if [ -z "$dry" ]; then
  timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" \
    || status=1
else
  echo "dry run: gpu tests not run" > "$out/gpu-tests.log"
fi
timeout 420 python3 -m bench.gpu --out "$out" $dry 2>&1 | tee "$out/gpu.log" || status=1
exit $status
