#!/usr/bin/env bash
# Builds resnet_fused._C for the GPU machine here, on a CPU machine with a package index and
# nvcc 13.0, so that benchmarks/gpu_check.sh copies it there in seconds instead of building it
# (2.5-3 of its minutes on 16 cores, where there is no package index).
#
#   bash benchmarks/build_gpu_extension.sh [PYTHON3.12] [--check]
#
# The GPU machine runs CPython 3.12 with torch 2.11.0+cu130 and an H200 (compute capability 9.0),
# and an extension module only loads into the Python minor version and the torch it was built
# against. So this script:
#   1. makes a throwaway venv (GPU_EXT_VENV, default /tmp/resnet_fused_gpu_ext_venv; reused while
#      it holds the right torch) with CPython 3.12: the interpreter given, else python3.12 on
#      PATH, else pyenv's 3.12.*; it stops with a message when there is none;
#   2. installs torch==2.11.0 into it from the package index (PyPI's manylinux wheel of 2.11.0 is
#      the CUDA 13.0 build, torch.__version__ 2.11.0+cu130, with its nvidia-* CUDA libraries as
#      dependencies: about 4 GB), and the CUTLASS headers nvidia-cutlass==4.2.0.0 (--no-deps), whose
#      wheel it also keeps in benchmarks/wheels/ for gpu_check.sh's fallback build;
#   3. builds a copy of setup.py, csrc/ and resnet_fused/ (build_ext --inplace) with
#      TORCH_CUDA_ARCH_LIST=9.0a FORCE_CUDA=1 (the sm90 CUTLASS kernels for sm_90a, the sm80 ones
#      for sm_90), MAX_JOBS as setup.py sets it (about 10 minutes on 2 cores);
#   4. puts _C.cpython-312-x86_64-linux-gnu.so and BUILD_INFO (Python tag, torch version, source hash of
#      setup.py + csrc/, archs, commit, date) into benchmarks/prebuilt/ (git-ignored). gpu_check.sh
#      uses it only where all three match and it loads, else builds on the device.
# --check stops before compiling: venv, torch, CUTLASS headers and setup.py's build configuration.
# Then call the device with carry ["benchmarks/prebuilt", "benchmarks/wheels"] (README, "The GPU machine").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_PIN=torch==2.11.0
TORCH_VERSION=2.11.0+cu130
CUTLASS_PIN=nvidia-cutlass==4.2.0.0
ARCHS=9.0a
VENV=${GPU_EXT_VENV:-/tmp/resnet_fused_gpu_ext_venv}
BUILD=${GPU_EXT_BUILD:-/tmp/resnet_fused_gpu_ext_build}
PREBUILT=$ROOT/benchmarks/prebuilt
CHECK=0
PY312=
for arg in "$@"; do
  case $arg in
    --check) CHECK=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "build_gpu_extension.sh: unknown option $arg" >&2; exit 2 ;;
    *) PY312=$arg ;;
  esac
done

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' > /dev/null 2>&1; }
if [ -z "$PY312" ]; then
  for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if is_312 "$candidate"; then PY312=$candidate; break; fi
  done
fi
if [ -z "$PY312" ] || ! is_312 "$PY312"; then
  echo "build_gpu_extension.sh: needs CPython 3.12, the GPU machine's Python (an extension module loads only" >&2
  echo "into the Python minor version it was built for). $([ -n "$PY312" ] && echo "$PY312 is not a Python 3.12" \
    || echo "No python3.12 on PATH or in pyenv"): give the path of one as the first argument." >&2
  exit 2
fi
echo "Python: $PY312 ($("$PY312" --version 2>&1))"
command -v nvcc > /dev/null || { echo "build_gpu_extension.sh: nvcc not found (CUDA 13.0 toolkit needed)" >&2; exit 2; }
echo "nvcc: $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

# 1-2. The venv, torch and the CUTLASS headers.
pip() {  # the venv's pip, without the warnings about this machine's extra index folders
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
  return "${PIPESTATUS[0]}"
}
torch_here() { "$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }
if [ -x "$VENV/bin/python" ] && is_312 "$VENV/bin/python" && [ "$(torch_here)" = "$TORCH_VERSION" ]; then
  echo "venv $VENV: reused (torch $TORCH_VERSION)"
else
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  echo "venv $VENV: installing $TORCH_PIN and its CUDA libraries from the package index (about 4 GB)"
  pip install -q --no-compile "$TORCH_PIN" "setuptools<82" wheel ninja numpy
fi
found=$(torch_here)
if [ "$found" != "$TORCH_VERSION" ]; then
  echo "build_gpu_extension.sh: $TORCH_PIN installed as torch ${found:-that does not import}, not $TORCH_VERSION" >&2
  echo "(the GPU machine's build; the index may serve another CUDA build under the same version)" >&2
  exit 1
fi
echo "torch: $found (CUDA $("$VENV/bin/python" -c 'import torch; print(torch.version.cuda)'))"
mkdir -p benchmarks/wheels
if ! ls benchmarks/wheels/nvidia_cutlass-4.2.0.0-*.whl > /dev/null 2>&1; then
  pip download -q --no-deps "$CUTLASS_PIN" -d benchmarks/wheels
fi
pip install -q --no-compile --no-deps --no-index --find-links benchmarks/wheels "$CUTLASS_PIN"
echo "CUTLASS: $(ls benchmarks/wheels/nvidia_cutlass-4.2.0.0-*.whl) (kept for gpu_check.sh's fallback build)"

# 3. Build a copy of the sources, so the working tree's own extension is left alone.
rm -rf "$BUILD"
mkdir -p "$BUILD"
tar -C "$ROOT" --exclude='*.so' --exclude=__pycache__ -cf - setup.py pyproject.toml README.md csrc resnet_fused \
  | tar -C "$BUILD" -xf -
source_hash=$("$VENV/bin/python" benchmarks/gpu_check_lib.py source-hash "$BUILD")
export TORCH_CUDA_ARCH_LIST=$ARCHS FORCE_CUDA=1
if [ "$CHECK" = 1 ]; then
  (cd "$BUILD" && "$VENV/bin/python" setup.py --name)
  echo "--check: ready to build (source hash $source_hash); not compiled"
  exit 0
fi
log=$BUILD/build.log
echo "building in $BUILD (TORCH_CUDA_ARCH_LIST=$ARCHS; log: $log)"
start=$(date +%s)
(cd "$BUILD" && "$VENV/bin/python" setup.py build_ext --inplace) > "$log" 2>&1 || {
  tail -40 "$log"; echo "build_gpu_extension.sh: the build failed (log: $log)" >&2; exit 1; }
grep -A14 "resnet_fused build configuration" "$log" || true
so=$(cd "$BUILD/resnet_fused" && ls _C.cpython-312-*.so)

# 4. The extension and what it was built from, for gpu_check.sh to compare.
if [ "$("$VENV/bin/python" benchmarks/gpu_check_lib.py source-hash)" != "$source_hash" ]; then
  echo "build_gpu_extension.sh: setup.py or csrc/ changed during the build; run it again" >&2
  exit 1
fi
rm -rf "$PREBUILT"
mkdir -p "$PREBUILT"
cp "$BUILD/resnet_fused/$so" "$PREBUILT/"
cat > "$PREBUILT/BUILD_INFO" <<EOF
so=$so
python_tag=cp312
python=$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')
torch=$found
source_hash=$source_hash
archs=$ARCHS
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)$([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (with uncommitted changes)')
built=$(date -u '+%Y-%m-%d %H:%M UTC') in $(( $(date +%s) - start )) s on $(nproc) cores
EOF
cat "$PREBUILT/BUILD_INFO"
ls -la "$PREBUILT"
echo "done: carry benchmarks/prebuilt and benchmarks/wheels to the GPU machine (README, \"The GPU machine\")"
