#!/usr/bin/env bash
# .whl/: the wheels the GPU machine's image lacks for the GPU check (bench/gpu.sh), for CPython 3.12 manylinux
# x86-64 — binary wheels from PyPI at the versions installed here, and DeepSpeed built as a wheel from its source
# archive (PyPI has no wheel of it; ops are not prebuilt, as `pip install deepspeed` does). What to carry is derived
# by `python -m bench.gpu_image carry` (deepspeed's requirement closure minus the image, plus timm as pinned).
#
#   bash bench/gpu_wheels.sh            # then carry .whl (the device tool's `carry: [".whl"]`)
#   RSB_WHEELS_PY=3.11 bash bench/gpu_wheels.sh DIR   # the same set for another CPython (bench/gpu.sh --rehearse)
#   RSB_WHEELS_REUSE=.whl ...           # take the pure-Python wheels (py3-none-any) from there instead of again
#
# Fails above 40 MiB (the tree sent to the GPU machine is at most 64 MiB). .whl/ is replaced only if this script
# wrote it (its marker inside).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.whl}"
pyver="${RSB_WHEELS_PY:-3.12}"
if [ -e "$out" ] && [ ! -f "$out/.rsb-output" ]; then
  echo "error: $out: exists and was not written by bench/gpu_wheels.sh (no $out/.rsb-output); move it away" >&2
  exit 1
fi
mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d "$out.partial-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mapfile -t pins < <(python3 -m bench.gpu_image carry)
binary=() ds=""
for p in "${pins[@]}"; do
  name=${p%%==*} ver=${p#*==}
  pure="${RSB_WHEELS_REUSE:-/nonexistent}/${name//-/_}-$ver-py3-none-any.whl"
  if [ -f "$pure" ]; then cp "$pure" "$tmp/"  # the same file for every CPython
  elif [[ "$p" == deepspeed==* ]]; then ds=$p
  else binary+=("$p"); fi
done
if [ ${#binary[@]} -gt 0 ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --abi "cp${pyver/./}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$tmp" "${binary[@]}"
fi
if [ -n "$ds" ]; then
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp/src" "$ds"
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" "$tmp"/src/deepspeed-*.tar.gz
  rm -rf "$tmp/src"
fi
echo '{"written_by": "bench/gpu_wheels.sh"}' > "$tmp/.rsb-output"
bytes=$(du -cb "$tmp"/*.whl | tail -1 | cut -f1)
ls -1 "$tmp"/*.whl | xargs -n1 basename
echo "total: $((bytes / 1024)) KiB in $(ls "$tmp"/*.whl | wc -l) wheels"
if [ "$bytes" -gt $((40 * 1024 * 1024)) ]; then
  echo "error: $out: $((bytes / 1048576)) MiB, over the 40 MiB budget (the tree sent is at most 64 MiB)" >&2
  exit 1
fi
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
