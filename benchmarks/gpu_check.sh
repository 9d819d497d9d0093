#!/usr/bin/env bash
# GPU check for slimc's CUDA targets: install, compile the test zoo (+ real MiniLM / SmolLM2
# when their packages are there) for CUDA, run on the GPU, compare with PyTorch on the same
# GPU, time against PyTorch eager and torch.compile. Sized for one H200 and < 10 minutes.
#
#   benchmarks/gpu_check.sh pack          # here (CPU host, pip works): fetch what the GPU
#                                         # machine lacks into .gpucheck/part1 and part2
#   benchmarks/gpu_check.sh stage DIR     # GPU machine: keep a carried part in /tmp/gpucheck
#   benchmarks/gpu_check.sh run [ARGS]    # GPU machine: install and run benchmarks/gpu_check.py
#
# Why parts: the device machine reaches no package index and a call carries at most 64 MiB;
# the apache-tvm wheel alone is ~100 MB (its compiler library), so it travels xz-compressed in
# two parts, one per call, while the machine stays warm between the calls:
#   run(carry=[".gpucheck/part1"], command="benchmarks/gpu_check.sh stage .gpucheck/part1")
#   run(carry=[".gpucheck/part2"], command="benchmarks/gpu_check.sh stage .gpucheck/part2 &&
#       benchmarks/gpu_check.sh run --out $OUT")       # immediately after the first
# The image there has python3 3.12 with torch, transformers, nvcc 13 and g++; slimc needs
# apache-tvm, apache-tvm-ffi and pydantic on top. Results go to docs/benchmarks.md ("GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/gpucheck
PY=${PYTHON:-python3}

pack() {
  local dir=.gpucheck tmp
  grep -qx '/.gpucheck/' .git/info/exclude 2>/dev/null || echo '/.gpucheck/' >> "$(git rev-parse --git-common-dir)/info/exclude"
  rm -rf "$dir" && mkdir -p "$dir/part1" "$dir/part2"
  tmp=$(mktemp -d)
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp
              --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
              --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64)
  $PY -m pip download -q --no-deps "${plat[@]}" -d "$tmp" \
      apache-tvm==0.27.0.post1 "apache-tvm-ffi<0.1.15" pydantic pydantic-core \
      annotated-types typing-inspection
  (cd "$tmp" && mkdir tvm && cd tvm && unzip -q ../apache_tvm-*.whl && \
     tar cf - . | xz -T0 -9 > ../tvm.tar.xz)
  split -b 45M "$tmp/tvm.tar.xz" "$tmp/tvm.tar.xz.part-"
  mv "$tmp"/tvm.tar.xz.part-aa "$dir/part1/"
  mv "$tmp"/tvm.tar.xz.part-a[b-z] "$dir/part2/"
  mv "$tmp"/apache_tvm_ffi-*.whl "$tmp"/pydantic*.whl "$tmp"/annotated_types-*.whl \
     "$tmp"/typing_inspection-*.whl "$dir/part2/"
  rm -rf "$tmp"
  du -sh "$dir"/part1 "$dir"/part2
}

stage() {
  mkdir -p "$STAGE" && cp "$1"/* "$STAGE"/ && ls -la "$STAGE"
}

install() {
  local site=/tmp/gpucheck-site
  [ -d "$site/tvm" ] && return 0
  mkdir -p "$site"
  cat "$STAGE"/tvm.tar.xz.part-* | xz -d | tar xf - -C "$site"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" "$STAGE"/*.whl
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
      --target "$site" .
}

run() {
  install
  export PYTHONPATH=/tmp/gpucheck-site PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  nvcc --version | tail -1 || true
  timeout 540 $PY benchmarks/gpu_check.py "$@"
}

case "${1:-run}" in
  pack) pack ;;
  stage) stage "$2" ;;
  run) shift || true; run "$@" ;;
  *) echo "usage: $0 pack | stage DIR | run [--target h100] [--out DIR] [--no-real]" >&2; exit 2 ;;
esac
