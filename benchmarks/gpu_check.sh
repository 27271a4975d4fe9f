#!/usr/bin/env bash
# The one command for a session lent the GPU machine (one H200, 16 cores, Python 3.12, torch
# 2.11.0+cu130, triton 3.6, no package index): the extension, the GPU tests, `resnet-fused
# verify` and the timings, each under a time budget, results packed into 3 files. With the
# prebuilt extension it ends in about 4 minutes; the README's "The GPU machine" has the exact
# call. GPU_CHECK_DEADLINE_S (default 450) bounds the whole run: no step gets more than is left
# of it, so the script ends, and packs, before the call's timeout_s (480).
#
#   GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh [OUT_DIR]   OUT_DIR: $OUT, else benchmarks/results/latest
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]          any machine: every step; what needs the GPU
#                                                             machine is shown, not run; exits 0
#
# Steps, with their budgets in seconds (a hard limit: SIGINT, SIGKILL 10 s later):
#   1 environment    15  nvidia-smi, versions, commit (GIT_COMMIT: the machine's copy has no .git)
#   2 extension      15  benchmarks/prebuilt/_C*.so copied into resnet_fused/ when its BUILD_INFO matches
#                        this Python, torch and source tree (benchmarks/build_gpu_extension.sh made it)
#                        and it loads (an import check, a few seconds); otherwise the fallback build,
#                        190 s: CUTLASS headers from benchmarks/wheels, then
#                        pip install -v --no-index --no-build-isolation --no-deps -e .
#                        with MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a (one CUTLASS file takes 2.5-3 min)
#   3 gpu-tests     120  pytest -m gpu -n 8 --maxfail=50 (serial without pytest-xdist), informative
#                        tests first (tests/conftest.py GPU_ORDER), RESNET_FUSED_AUTOTUNE=0: one fixed
#                        config per tile class (tests/codegen/test_autotune_off.py runs every config once)
#   4 verify         40  resnet-fused verify, fp16 and bf16, batch 8, 224 px; triton fp16, triton bf16
#                        and cuda as three processes side by side (their ms columns overlap)
#   5 timings        40  benchmarks/gpu_timings.py: each ResNet-50 conv shape (batch 64) and the whole
#                        model (batch 128, BN in fp32), RESNET_FUSED_AUTOTUNE=2 (first 2 configs)
#   6 train-timing   20  resnet-fused bench --mode train, ResNet-50, batch 64, fp16, autotuning off
#   7 pack               OUT_DIR/summary.md (the table; rewritten after every step),
#                        OUT_DIR/gpu_check.tar.gz (every log, junit XML, failures.txt, CSVs; re-packed
#                        after every step), OUT_DIR/gpu_check.log (the console, as it runs)
# With the prebuilt extension the budgets add up to 250 s; the fallback build adds 175 s.
#
# Settings (environment): PYTHON (python3), GIT_COMMIT, GPU_CHECK_DEADLINE_S (450),
# GPU_CHECK_BUDGET_<STEP> (ENVIRONMENT PREBUILT BUILD TESTS VERIFY TIMINGS TRAIN: seconds),
# GPU_CHECK_STEPS (comma-separated step names to run; default all), GPU_CHECK_PREBUILT
# (benchmarks/prebuilt), GPU_CHECK_WORK (work folder; default a fresh one, removed at the end),
# GPU_CHECK_DRY_SLEEP (seconds each dry-run stand-in sleeps: tests the time limits),
# GPU_CHECK_XDIST (8: pytest-xdist workers; 0 for a serial run).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

DRY=0
OUT_ARG=
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUT_ARG=$arg ;;
  esac
done
OUT=${OUT_ARG:-${OUT:-benchmarks/results/latest}}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK=$GPU_CHECK_WORK; KEEP_WORK=1; mkdir -p "$WORK" || exit 2
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2; KEEP_WORK=0
fi
PY=${PYTHON:-python3}
LIB=benchmarks/gpu_check_lib.py
PREBUILT=${GPU_CHECK_PREBUILT:-benchmarks/prebuilt}
DEADLINE=${GPU_CHECK_DEADLINE_S:-450}
PACK_RESERVE=10
STEPS=${GPU_CHECK_STEPS:-environment,extension,gpu-tests,verify,timings,train-timing}
ALL_STEPS=(environment extension gpu-tests verify timings train-timing pack)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
STATUS=0
INTERRUPTED=0
STEP_NO=0
: > "$WORK/steps.tsv"

# The console goes to OUT_DIR/gpu_check.log as it is printed.
exec 3>&1 4>&2
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

elapsed() { echo $(( $(date +%s) - START )); }

# limit NAME DEFAULT: the step's budget (GPU_CHECK_BUDGET_NAME overrides), cut to what is left
# of the deadline after the time packing needs.
limit() {
  local var="GPU_CHECK_BUDGET_$1" b left
  b=${!var:-$2}
  left=$(( DEADLINE - $(elapsed) - PACK_RESERVE ))
  (( left < b )) && b=$left
  echo "$b"
}

header() {
  STEP_NO=$((STEP_NO + 1))
  printf '\n=== [%d/%d] %s (%sat %d s)%s\n' "$STEP_NO" "${#ALL_STEPS[@]}" "$1" "${2:+budget $2 s, }" "$(elapsed)" \
    "$([ "$DRY" = 1 ] && echo ', dry run')"
}

wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

# launch LOG LIMIT DEVICE_ONLY CMD...: start CMD in the background under its time limit, its
# output appended to LOG as it comes; its exit status goes to LOG.rc (124: time limit). In a dry
# run a DEVICE_ONLY=1 command is shown and replaced by a stand-in.
JOBS=()
FROM=()
launch() {
  local log=$1 lim=$2 device_only=$3
  shift 3
  FROM+=($(( $(stat -c %s "$log" 2>/dev/null || echo 0) + 1 )))  # await shows the log from here
  printf '$ %s\n' "$*" >> "$log"
  if [ "$DRY" = 1 ] && [ "$device_only" = 1 ]; then
    set -- bash -c 'echo "[dry run] not run: needs the GPU machine"; sleep "${GPU_CHECK_DRY_SLEEP:-0}"'
  fi
  rm -f "$log.rc" "$log.pid"
  (
    timeout -s INT -k 10 "$lim" "$@" >> "$log" 2>&1 &
    echo $! > "$log.pid"
    wait $!
    echo $? > "$log.rc"
  ) &
  JOBS+=($!)
}

# await [--quiet] LOG...: show the logs on the console as they grow (unless --quiet), until every
# launched job has ended; then print each one's status. Returns 0 if all exited 0, 124 if any hit
# its time limit, else 1.
await() {
  local quiet=0 tailer= watcher log rc worst=0
  [ "${1:-}" = --quiet ] && { quiet=1; shift; }
  local jobs=("${JOBS[@]}")
  ( for p in "${jobs[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.5; done; done ) &
  watcher=$!
  if [ "$quiet" = 0 ]; then
    tail -c +"${FROM[0]:-1}" -f --pid="$watcher" "$@" 2>/dev/null &
    tailer=$!
  fi
  for p in "${jobs[@]}"; do
    while kill -0 "$p" 2>/dev/null; do wait "$p"; done  # a trapped signal interrupts wait: wait again
  done
  wait "$watcher" 2>/dev/null
  [ -n "$tailer" ] && wait "$tailer" 2>/dev/null
  JOBS=()
  FROM=()
  for log in "$@"; do
    rc=$(cat "$log.rc" 2>/dev/null || echo 255)
    [ "$rc" = 0 ] || echo "--> $(basename "$log"): exit status $rc$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (time limit)')"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then worst=124; elif [ "$rc" != 0 ] && [ "$worst" = 0 ]; then worst=1; fi
  done
  return "$worst"
}

on_signal() {
  INTERRUPTED=1
  echo "gpu_check.sh: interrupted; stopping the running step and packing what there is"
  local f
  for f in "$WORK"/*.pid; do [ -f "$f" ] && kill -INT "$(cat "$f")" 2>/dev/null; done
}
trap on_signal INT TERM

# record NAME RC SECONDS BUDGET RESULT: one row of the summary; the summary and the archive are
# rewritten at once, so a run cut short (even by SIGKILL) still brings back every finished step.
record() {
  local status
  case $2 in
    0) status=$([ "$DRY" = 1 ] && echo "ok (dry run)" || echo ok) ;;
    124|137) status=TIMEOUT; STATUS=1 ;;
    skip) status=SKIPPED ;;
    *) status=FAILED; STATUS=1 ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$status" "$3" "$4" "$5" >> "$WORK/steps.tsv"
  echo "--- $1: $status in $3 s (budget $4 s)${5:+: $5}"
  pack_now
}

pack_now() {
  "$PY" "$LIB" summary "$WORK" "$OUT/summary.md" > /dev/null 2>&1 || echo "summary failed"
  # Logs over 8 MB keep their last 8 MB (a verbose build log), so the archive stays under 16 MiB.
  local f
  for f in "$WORK"/*.log; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 8000000 ] && { tail -c 8000000 "$f" > "$f.tmp" && mv "$f.tmp" "$f"; }
  done
  tar -czf "$OUT/gpu_check.tar.gz.tmp" -C "$WORK" --exclude='*.rc' --exclude='*.pid' . 2>/dev/null \
    && mv "$OUT/gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}

# run_step NAME BUDGET FUNCTION: header, the function, its row (skipped when not in
# GPU_CHECK_STEPS, after an interruption, or when the deadline leaves under 5 s).
run_step() {
  local name=$1 budget=$2 fn=$3 t0 rc
  header "$name" "$budget"
  if ! wanted "$name"; then echo "not in GPU_CHECK_STEPS"; record "$name" skip 0 "$budget" "not selected"; return; fi
  if [ "$INTERRUPTED" = 1 ] || (( DEADLINE - $(elapsed) - PACK_RESERVE < 5 )); then
    echo "skipped: $([ "$INTERRUPTED" = 1 ] && echo interrupted || echo 'no time left before the deadline')"
    record "$name" skip 0 "$budget" "no time left"; return
  fi
  t0=$(date +%s)
  RESULT=
  BUDGET_SHOWN=$budget
  "$fn" "$budget"
  rc=$?
  record "$name" "$rc" "$(( $(date +%s) - t0 ))" "$BUDGET_SHOWN" "$RESULT"
}

# ------------------------------------------------------------------------------------------------
step_environment() {
  local log=$WORK/environment.log driver nvcc_version
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
  nvcc_version=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  {
    echo "driver=${driver:-none}"
    echo "nvcc=${nvcc_version:-none}"
    echo "source_hash=$("$PY" "$LIB" source-hash)"
  } >> "$WORK/meta.env"
  {
    cat "$WORK/meta.env"
    echo; echo "\$ nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available here"
    echo; echo "\$ nvidia-smi --query-gpu=..."
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu \
      --format=csv 2>&1 || true
    echo; echo "\$ nvcc --version"; nvcc --version 2>&1 | tail -2 || true
    echo; git status --porcelain --untracked-files=no 2>/dev/null | head -20
  } > "$log" 2>&1
  launch "$WORK/versions.log" "$1" 0 "$PY" "$LIB" versions
  await --quiet "$WORK/versions.log"
  local rc=$?
  grep -v '^\$ ' "$WORK/versions.log" > "$WORK/versions.env"
  cat "$WORK/meta.env" "$WORK/versions.env"
  grep -q '^torch=unavailable' "$WORK/versions.env" && rc=1
  RESULT="$(sed -n 's/^gpu=//p' "$WORK/versions.env" | head -1)"
  RESULT="${RESULT:-no GPU visible}, torch $(sed -n 's/^torch=//p' "$WORK/versions.env" | head -1)"
  return $rc
}

EXT_CHECK='import resnet_fused._extension as e, resnet_fused.cli as cli
assert e.has_cuda_ops(), e.LOAD_ERROR or "the extension was built without CUDA"
cli.main(["info"])'

step_extension() {
  local log=$WORK/extension.log so rc copied=
  if so=$("$PY" "$LIB" prebuilt "$PREBUILT" "$WORK/versions.env" 2>&1); then
    echo "prebuilt extension matches this Python, torch and source tree: $so" | tee -a "$log"
    if [ "$DRY" = 1 ]; then
      echo "[dry run] would copy it into resnet_fused/" | tee -a "$log"
    else
      cp "$so" resnet_fused/ && copied=resnet_fused/$(basename "$so")
    fi
    launch "$log" "$1" 1 "$PY" -c "$EXT_CHECK"
    if await "$log"; then
      RESULT="prebuilt ($(basename "$so"))"
      echo "extension=$RESULT" >> "$WORK/meta.env"
      return 0
    fi
    echo "the prebuilt extension does not load here: building instead" | tee -a "$log"
    [ -n "$copied" ] && rm -f "$copied"
  else
    echo "$so; building on the device instead" | tee -a "$log"
  fi

  local budget
  budget=$(limit BUILD 190)
  BUDGET_SHOWN="$1 + build $budget"
  echo "build budget: $budget s"
  if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" 2>/dev/null; then
    launch "$log" 60 1 "$PY" -m pip install --no-index --no-deps --find-links benchmarks/wheels nvidia-cutlass==4.2.0.0
    await "$log" || echo "CUTLASS headers missing: carry benchmarks/wheels (benchmarks/build_gpu_extension.sh fills it)"
  fi
  echo "building: MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a, log: build.log"
  launch "$WORK/build.log" "$budget" 1 env MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" \
    FORCE_CUDA=1 "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e .
  local t0=$SECONDS
  await --quiet "$WORK/build.log"
  rc=$?
  grep '^\$ ' "$WORK/build.log" | tail -1
  grep -A14 "resnet_fused build configuration" "$WORK/build.log" || true
  if [ $rc != 0 ]; then
    echo "BUILD FAILED (last lines of build.log):"; tail -30 "$WORK/build.log"
    RESULT="build failed (the cuda backend's tests fail; the triton ones still run)"
    echo "extension=$RESULT" >> "$WORK/meta.env"
    return $rc
  fi
  launch "$log" 30 1 "$PY" -c "$EXT_CHECK"
  await "$log"
  rc=$?
  if [ "$DRY" = 1 ]; then
    RESULT="no matching prebuilt: the GPU machine would build it"
  else
    RESULT="built on the device in $(( SECONDS - t0 )) s$([ $rc = 0 ] || echo ', but it does not load')"
  fi
  echo "extension=$RESULT" >> "$WORK/meta.env"
  return $rc
}

step_gpu_tests() {
  local log=$WORK/gpu_tests.log rc xdist=() workers=${GPU_CHECK_XDIST:-8} counts
  if [ "$workers" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    xdist=(-n "$workers")
  else
    echo "pytest-xdist missing (or GPU_CHECK_XDIST=0): one process" | tee -a "$log"
  fi
  local args=(-m pytest tests -m gpu --maxfail=50 -q -rfE --durations=15 -p no:cacheprovider
              --junitxml="$WORK/gpu_tests.xml")
  if [ "$DRY" = 1 ]; then
    echo "[dry run] would run: TRITON_INTERPRET=0 RESNET_FUSED_AUTOTUNE=0 $PY ${args[*]} ${xdist[*]}" | tee -a "$log"
    echo "[dry run] collecting instead, in the order the GPU run takes (gpu_tests_collect.log):" | tee -a "$log"
    launch "$WORK/gpu_tests_collect.log" "$1" 0 "$PY" -m pytest tests -m gpu --collect-only -q -p no:cacheprovider
    await --quiet "$WORK/gpu_tests_collect.log"
    rc=$?
    sed -n '2,9p' "$WORK/gpu_tests_collect.log"; echo "..."; tail -1 "$WORK/gpu_tests_collect.log"
    RESULT="collected: $(tail -1 "$WORK/gpu_tests_collect.log")"
    return $rc
  fi
  launch "$log" "$1" 1 env TRITON_INTERPRET=0 RESNET_FUSED_AUTOTUNE=0 "$PY" "${args[@]}" "${xdist[@]}"
  await "$log"
  rc=$?
  counts=$("$PY" "$LIB" junit "$WORK/gpu_tests.xml" "$WORK/failures.txt")
  RESULT=$counts
  return $rc
}

step_verify() {
  local spec backend dtypes tag logs=() csvs=() rc
  for spec in "triton fp16" "triton bf16" "cuda fp16,bf16"; do
    read -r backend dtypes <<< "$spec"
    tag=$backend-${dtypes//,/-}
    logs+=("$WORK/verify-$tag.log"); csvs+=("$WORK/verify-$tag.csv")
    launch "$WORK/verify-$tag.log" "$1" 1 env TRITON_INTERPRET=0 RESNET_FUSED_AUTOTUNE=0 "$PY" -m resnet_fused verify \
      --backend "$backend" --dtype "$dtypes" --batch 8 --size 224 --reps 2 --csv "$WORK/verify-$tag.csv"
  done
  await "${logs[@]}"
  rc=$?
  RESULT=$("$PY" "$LIB" verify-csv "$WORK/verify.csv" "${csvs[@]}")
  return $rc
}

step_timings() {
  launch "$WORK/timings.log" "$1" 1 env TRITON_INTERPRET=0 RESNET_FUSED_AUTOTUNE=2 "$PY" benchmarks/gpu_timings.py \
    --out "$WORK" --batch 64 --e2e-batch 128 --rounds 5 --reps 5
  await "$WORK/timings.log"
  local rc=$?
  RESULT="$(grep -c '^\[[0-9]' "$WORK/timings.log") conv shapes timed$([ -f "$WORK/resnet50_e2e.csv" ] && echo ', end to end done')"
  return $rc
}

step_train_timing() {
  launch "$WORK/train.log" "$1" 1 env TRITON_INTERPRET=0 RESNET_FUSED_AUTOTUNE=0 "$PY" -m resnet_fused bench --mode train \
    --model resnet50 --batch 64 --dtype fp16 --warmup 2 --rounds 5 --no-compile --csv "$WORK/train_resnet50.csv"
  await "$WORK/train.log"
  local rc=$?
  RESULT=$([ -f "$WORK/train_resnet50.csv" ] && echo "train_resnet50.csv written" || echo "no result")
  return $rc
}

finish() {
  trap - EXIT INT TERM
  header pack ""
  "$PY" "$LIB" summary "$WORK" "$OUT/summary.md" > /dev/null 2>&1
  printf 'pack\t%s\t-\t-\t%s\n' "$([ "$STATUS" = 0 ] && echo ok || echo "run FAILED")" \
    "files: summary.md, gpu_check.tar.gz, gpu_check.log" >> "$WORK/steps.tsv"
  pack_now
  rm -f "$OUT/gpu_check.tar.gz.tmp"
  echo
  cat "$OUT/summary.md"
  echo
  echo "=== done in $(elapsed) s, status $STATUS; $OUT: $(ls "$OUT" | tr '\n' ' ')"
  [ "$KEEP_WORK" = 1 ] || rm -rf "$WORK"
  exec 1>&3 2>&4
  local i  # let tee finish the console log, but never hang on it
  for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.5; done
  exit "$STATUS"
}
trap finish EXIT

COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no .git here: pass GIT_COMMIT)")}
if [ -z "${GIT_COMMIT:-}" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT (with uncommitted changes)"
fi
{
  echo "mode=$([ "$DRY" = 1 ] && echo 'dry run (GPU work shown, not run)' || echo 'GPU run')"
  echo "commit=$COMMIT"
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "host=$(hostname 2>/dev/null || echo '?'), $(nproc) cores, $(free -g 2>/dev/null | awk '/^Mem/{print $2}') GiB"
} > "$WORK/meta.env"

run_step environment "$(limit ENVIRONMENT 15)" step_environment
run_step extension "$(limit PREBUILT 15)" step_extension
run_step gpu-tests "$(limit TESTS 120)" step_gpu_tests
run_step verify "$(limit VERIFY 40)" step_verify
run_step timings "$(limit TIMINGS 40)" step_timings
run_step train-timing "$(limit TRAIN 20)" step_train_timing
