#!/usr/bin/env bash
# The one script for a session lent a GPU: build, GPU tests, fused-vs-unfused timings
# (inference per conv shape and end to end; a ResNet-50 training step).
# Writes everything under $OUT (or the folder given as $1). Planned for about 10 minutes on an
# H100, not yet measured since the CUTLASS kernels came in (they add 1-2 minutes of build on 16
# cores and ~500 GPU test cases); the steps' time limits add up to 14 minutes.
# The device machine has no package index: the install uses what is already there, plus the
# CUTLASS wheel from benchmarks/wheels/ (below).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# The device machine's copy of the tree may lack .git: pass the commit in, e.g.
#   GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh "$OUT"
# Dry run on a CPU machine (GPU tests skip; timings on the CPU at toy sizes):
#   TIMINGS_ARGS="--device cpu --batch 1 --size 64 --e2e-batch 1 --rounds 2 --reps 1" bash benchmarks/gpu_check.sh /tmp/gpu_check
#
# The CUDA build needs the CUTLASS headers of the pinned wheel nvidia-cutlass==4.2.0.0. The device
# machine has no package index, so when `import cutlass_library` fails the script installs the
# wheel from benchmarks/wheels/ (git-ignored). Fill that folder beforehand, on a machine with
# the index, with this one command:
#   pip download --no-deps nvidia-cutlass==4.2.0.0 -d benchmarks/wheels
# benchmarks/wheels/ is git-ignored, so a tool that copies only tracked or non-ignored files to
# the GPU machine must be told to carry it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results/latest}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start )) s)"; }

step "environment" | tee "$OUT/env.txt"
{
  date -u +"%Y-%m-%d %H:%M UTC"
  echo "commit ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  git status --porcelain --untracked-files=no 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version 2>&1 | tail -2
} 2>&1 | tee -a "$OUT/env.txt"

step "CUTLASS headers (nvidia-cutlass==4.2.0.0)"
if "$PY" -c "import cutlass_library" 2>/dev/null; then
  echo "cutlass_library present"
elif ! "$PY" -m pip install --no-deps --no-index --find-links benchmarks/wheels nvidia-cutlass==4.2.0.0 \
    > "$OUT/cutlass_install.log" 2>&1; then
  echo "CUTLASS INSTALL FAILED: fill benchmarks/wheels first (see this script's header)"
  tail -5 "$OUT/cutlass_install.log"; status=1
fi

step "build (pip install --no-build-isolation --no-deps -e .)"
# Only the GPU present: compiling for it alone halves the nvcc time. With 9.0 the build holds the
# sm90 CUTLASS kernels (sm_90a) and the sm80 ones (sm_90 cubins, the fallback on Hopper); with
# enough cores setup.py compiles those groups at the same time as the other sources.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ! timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED (tail of $OUT/build.log):"; tail -40 "$OUT/build.log"; status=1
fi
grep -A12 "resnet_fused build configuration" "$OUT/build.log" || true
TRITON_INTERPRET=0 "$PY" -m resnet_fused.cli info 2>&1 | tee "$OUT/info.txt"

step "GPU tests (pytest -m gpu)"
# One autotuner config per launch here (test_every_autotuner_config runs them all); SIGINT on
# timeout so pytest still prints its summary and writes the junit file.
# ~500 of the cases are the CUTLASS path's (test_cutlass_*: every ResNet-50 conv shape), hence 300 s.
TRITON_INTERPRET=0 RESNET_FUSED_AUTOTUNE=0 timeout -s INT -k 20 300 "$PY" -m pytest tests -m gpu -q -rs --durations=10 \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "timings (ResNet-50 conv shapes, batch 64; end to end, batch 256)"
TRITON_INTERPRET=0 timeout -s INT -k 20 150 "$PY" benchmarks/gpu_timings.py --out "$OUT" ${TIMINGS_ARGS:-} 2>&1 | tee "$OUT/timings.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "training step (ResNet-50, batch 128, AMP fp16, channels_last): eager vs fused"
TRITON_INTERPRET=0 timeout -s INT -k 20 100 "$PY" -m resnet_fused bench --mode train --model resnet50 --batch 128 \
  --dtype fp16 --channels-last --rounds 10 --csv "$OUT/train_resnet50.csv" 2>&1 | tee "$OUT/train.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "done, status $status"
exit $status
