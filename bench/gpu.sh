#!/usr/bin/env bash
# The GPU check: one script, <= 6 minutes on one H100/H200-class GPU with the install (its three steps' timeouts add up
# to 335 s), so a second try fits in the 15 minutes a GPU machine is lent; everything it measured under one folder, in
# the order it runs: versions.txt, stage.log/.json, gpu-tests.log (+ -summary.txt), gpu.log/.json/.md.
#
#   bash bench/gpu_wheels.sh                   # here: .whl/, what the GPU machine's image lacks (7 wheels, ~7 MiB)
#   bash bench/gpu.sh [OUT]                    # there, with .whl carried (OUT defaults to bench-gpu/)
#   bash bench/gpu.sh --rehearse [OUT]         # here, on the CPU: the same script in a fresh virtual environment
#                                              # that holds only what the GPU image holds, wheels installed as there
#   bash bench/gpu.sh --dry-run [OUT]          # anywhere, in this environment: tiny sizes on the CPU (CI)
#
# On the GPU machine the image has torch, timm, scipy, pytest ... but not deepspeed, pydantic, hjson, mlflow or dvc
# (bench/gpu_image.py lists it): the carried wheels go into /tmp/site with `pip install --no-index --no-deps
# --target`, which installs no console script, so the launcher runs DeepSpeed's runner as a module, and every child
# process extends PYTHONPATH. Steps, each logged under OUT: the machine's versions and card (versions.txt), the
# pipeline's commands through the real launcher (stage.log, stage.json: bench/gpu_stage.py), pytest -m gpu
# (gpu-tests.log), the measurements (gpu.log, gpu.json, gpu.md: bench/gpu.py). The rehearsal runs all of them with CPU
# sizes: the gpu tests' CUDA cases skip without CUDA after every import (their CPU cases run in the suite).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
case "${1:-}" in --dry-run) mode=dry; shift ;; --rehearse) mode=rehearse; shift ;; esac
out="${1:-bench-gpu}"
mkdir -p "$out"
py=python3 site=/tmp/site whl=.whl devices=1
if [ "$mode" = rehearse ]; then
  [ -f .whl/.rsb-output ] || { echo "error: .whl: not built; run bash bench/gpu_wheels.sh first" >&2; exit 1; }
  env=$(mktemp -d "${TMPDIR:-/tmp}/rsb-rehearse-XXXXXX")
  trap 'rm -rf "$env"' EXIT  # the rehearsal's own environment (links, wheels, builds: ~60 MiB), nothing else
  python3 -m venv "$env/venv" || exit 1
  python3 -m bench.gpu_image farm "$env/image" || exit 1
  echo "$env/image" > "$("$env/venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/image.pth"
  # the same wheels for this machine's CPython (the GPU image's is 3.12; torch here is for 3.11)
  ver=$("$env/venv/bin/python3" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if [ "$ver" = 3.12 ]; then whl=.whl; else RSB_WHEELS_PY="$ver" RSB_WHEELS_REUSE=.whl bash bench/gpu_wheels.sh "$env/whl" >/dev/null || exit 1; whl="$env/whl"; fi
  diff <(ls .whl | sed 's/-cp3[0-9]*-cp3[0-9]*-.*//') <(ls "$whl" | sed 's/-cp3[0-9]*-cp3[0-9]*-.*//') \
    || { echo "error: the rehearsal's wheels are not .whl's" >&2; exit 1; }
  py="$env/venv/bin/python3" site="$env/site" devices=2
  export PATH="$env/venv/bin:/usr/local/bin:/usr/bin:/bin" DS_ACCELERATOR=cpu  # no console script of this machine
  # DeepSpeed builds its CPU shared-memory op on first use (torch's JIT, ~40 s) into torch's extensions folder: a
  # build from this environment's sources there would replace this machine's own, and its next run builds it again
  export TORCH_EXTENSIONS_DIR="$env/torch_extensions"
fi
if [ "$mode" = gpu ] && ! ls "$whl"/*.whl >/dev/null 2>&1; then
  echo "error: $whl: no wheels; run bash bench/gpu_wheels.sh here first and carry .whl (every step needs deepspeed)" >&2
  exit 1
fi
if [ "$mode" != dry ] && ls "$whl"/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl \
    || exit 1
  export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 RSB_TRACKING=off
# first, what the machine is (kept even if everything after it is cut)
"$py" - <<'PY' 2>&1 | tee "$out/versions.txt"
import importlib.metadata as md, platform
import torch
names = ("torch", "timm", "numpy", "typing_extensions", "deepspeed", "pydantic")
print("python", platform.python_version(), *(f"{n} {md.version(n) if n in {d.metadata['Name'].replace('-', '_').lower() for d in md.distributions()} else '-'}" for n in names))
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, "driver-visible devices", torch.cuda.device_count(), torch.cuda.get_device_name(torch.device("cuda", 0)))
else:
    print("no CUDA device")
PY
status=0
# cheapest and most telling first; each step writes as it goes, and a step cut by its timeout says so in its log
t_stage=60 t_tests=140 t_bench=135  # on the GPU machine (<= 6 min with the install); the CPU has no such budget
[ "$mode" = gpu ] || t_stage=900 t_tests=900 t_bench=900
cut() {  # cut LOG SECONDS: the step ran past its timeout (exit 124): say so where its results are
  echo "CUT: this step ran past its ${2} s timeout; the lines above are what it finished" | tee -a "$1"
}
if [ "$mode" = dry ]; then
  echo "dry run: gpu tests and the pipeline's commands not run" > "$out/gpu-tests.log"
else
  # 1. the user's path: the pipeline's commands through the real launcher on this device (stage.log, stage.json)
  timeout $t_stage "$py" -m bench.gpu_stage --out "$out" --devices "$devices" 2>&1 | tee "$out/stage.log"
  rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=1; [ "$rc" -ne 124 ] || cut "$out/stage.log" $t_stage
  # 2. the gpu tests, one line each as it finishes (-v), in one process on the one card (the project's addopts, -n
  # auto, replaced), at most 90 s a test (the image's pytest-timeout); gpu-tests-summary.txt holds the finished
  # tests' lines even when the step is cut
  timeout $t_tests "$py" -m pytest -v -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts="--strict-markers -ra" \
    --timeout 90 --durations=10 2>&1 | tee "$out/gpu-tests.log"
  rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=1; [ "$rc" -ne 124 ] || cut "$out/gpu-tests.log" $t_tests
  grep -E "(PASSED|FAILED|SKIPPED|ERROR)( |$)" "$out/gpu-tests.log" > "$out/gpu-tests-summary.txt" || true
fi
# 3. the measurements: gpu.json and gpu.md rewritten after every phase, a phase cut by the timeout named there
dry=""; [ "$mode" = gpu ] || dry="--dry-run"
timeout $t_bench "$py" -m bench.gpu --out "$out" $dry 2>&1 | tee "$out/gpu.log"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=1; [ "$rc" -ne 124 ] || cut "$out/gpu.log" $t_bench
exit $status
