#!/usr/bin/env bash
# Run slimc artifacts built on a CPU host on a GPU machine (benchmarks/gpu_prebuilt.py).
#
#   python benchmarks/gpu_prebuilt.py prepare   # here: artifacts + references in .gpucheck/
#   benchmarks/gpu_prebuilt.sh pack             # here: TVM's runtime alone + wheels, same folder
#   benchmarks/gpu_prebuilt.sh run --out DIR    # GPU machine: one device call carrying
#                                               # .gpucheck/{wheels,tvm-runtime.tar.xz,rows.tar.xz}
#
# The GPU machine reaches no package index. What it lacks travels in .gpucheck/: the `tvm`
# package without libtvm_compiler.so (running an artifact needs TVM's runtime only; ~4 MB
# compressed instead of ~100 MB), tvm-ffi and slimc's pure-Python dependencies as cp312 wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.gpucheck
PY=${PYTHON:-python3}

pack() {
  mkdir -p "$STAGE/wheels"
  grep -qx '/.gpucheck/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
    || echo '/.gpucheck/' >> "$(git rev-parse --git-common-dir)/info/exclude"
  local venv=${VENV:-.venv}
  "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$STAGE/wheels" \
      "apache-tvm-ffi==$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')" \
      "pydantic==$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pydantic"))')" \
      "pydantic-core==$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pydantic-core"))')" \
      annotated-types typing-inspection pyelftools archspec platformdirs
  local tvm_dir
  tvm_dir=$("$venv/bin/python" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("tvm").origin))')
  tar cf - -C "$(dirname "$tvm_dir")" --exclude='__pycache__' --exclude='libtvm_compiler.so' tvm \
      | xz -T0 -6 > "$STAGE/tvm-runtime.tar.xz"
  # the prepared rows without the CUDA sources (kernels.cu: for reading, not needed to run);
  # ROWS="a b ..." (row folder names) keeps the 64 MiB a device call carries
  local rows=()
  if [ -n "${ROWS:-}" ]; then for r in $ROWS; do rows+=("rows/$r"); done; else rows=(rows); fi
  tar cf - -C "$STAGE" --exclude=kernels.cu "${rows[@]}" | xz -T0 -6 > "$STAGE/rows.tar.xz"
  du -sh "$STAGE"/wheels "$STAGE"/tvm-runtime.tar.xz "$STAGE"/rows.tar.xz
  echo "carry: .gpucheck/wheels .gpucheck/tvm-runtime.tar.xz .gpucheck/rows.tar.xz"
}

install() {
  local site=/tmp/slimc-site
  [ -d "$site/tvm" ] && return 0
  mkdir -p "$site"
  [ -f "$STAGE/rows.tar.xz" ] && xz -dc "$STAGE/rows.tar.xz" | tar xf - -C "$STAGE"
  xz -dc "$STAGE/tvm-runtime.tar.xz" | tar xf - -C "$site"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" "$STAGE"/wheels/*.whl
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" .
}

run() {
  install
  export PYTHONPATH=/tmp/slimc-site PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  $PY -c 'import tvm, tvm.base as b; print("tvm", tvm.__version__, "runtime only:", b._RUNTIME_ONLY)' || true
  timeout 380 $PY benchmarks/gpu_prebuilt.py check --budget-s 300 "$@" || echo "check exited $?"
  # the command line a user runs on the GPU machine: run, bench, generate (exit codes kept)
  # (from /tmp: `python -m` puts the working folder first on sys.path, and the repo's slimc/
  # folder is not the installed package)
  local rows=$PWD/$STAGE/rows
  (cd /tmp && timeout 40 $PY -m slimc run "$rows/tiny-bert_fp16/artifact.slimc" --json) \
    || echo "run exited $?"
  (cd /tmp && timeout 40 $PY -m slimc bench "$rows/minilm_shape_b8_fp16/artifact.slimc" \
    --runs 20 --json) || echo "bench exited $?"
  (cd /tmp && timeout 40 $PY -m slimc generate "$rows/tiny-llama_generate_fp16/artifact.slimc" \
    --prompt-ids 1,2,3 -n 8 --json) || echo "generate exited $?"
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  # per-kernel NaN and time trace of prepared artifacts (benchmarks/gpu_kernel_trace.py)
  trace) shift; install; PYTHONPATH=/tmp/slimc-site PYTHONUNBUFFERED=1 \
           $PY benchmarks/gpu_kernel_trace.py "$@" ;;
  *) echo "usage: $0 pack | run [--out DIR] [--only TEXT] | trace ARTIFACT... [--time]" >&2
     exit 2 ;;
esac
