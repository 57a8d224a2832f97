#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and no network: build fusedrnn for this GPU, run the
# CUDA tests, run compute-sanitizer (memcheck, racecheck, synccheck) on a small forward+backward,
# and benchmark against torch.nn (cuDNN), writing everything into OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Needs, preinstalled: PyTorch with CUDA, nvcc, pybind11, scikit-build-core, cmake, ninja, pytest
# (matplotlib optional: the PNG chart). Every step runs even when an earlier one failed; each
# step's status goes to OUTDIR/status.md and the script exits non-zero when any step failed.
#
# Environment (all optional):
#   PYTHON              interpreter that holds torch (default: python3)
#   GPU_CHECK_BUILD     pip (default): pip install --no-build-isolation, as a user would;
#                       cmake: developer build into python/fusedrnn, run with PYTHONPATH=python
#   GPU_CHECK_ARCH      compute capability digits, e.g. 90 (default: detected)
#   GPU_CHECK_COMMIT    commit to record (default: git rev-parse HEAD). Set it from the machine
#                       that sends the tree: a lent GPU machine's copy of .git was seen to lag
#                       (2026-11-27: it named the session's first commit, not the one that ran)
#   GPU_CHECK_PYTEST_K  pytest -k expression (default: "cuda and not cuda_emu": the tests marked
#                       cuda, a marker being a keyword, and those parametrized over the 'cuda'
#                       backend; not the emulator's)
#   GPU_CHECK_PRESET    benchmark preset (default: gpu, which holds the anchor LSTM B=16 T=1024
#                       H=768 in fp16 and bf16)
#   GPU_CHECK_IMPLS     the benchmark's --impls (default: all available; torch is always added)
#   GPU_CHECK_TEST_TIMEOUT  seconds one test may take before pytest-timeout ends the run (default
#                       150; only where pytest-timeout is installed), so a hung kernel cannot eat
#                       the lease
#   GPU_CHECK_SKIP      space-separated steps to skip: build import tests memcheck racecheck bench
#                       synccheck graphs probe ncu (e.g. to finish, on a machine that is still
#                       warm, what an earlier run did not reach)
#   GPU_CHECK_GRAPHS    1: last, also run the compile preset (fusedrnn and torch.nn
#                       eager, replayed from CUDA graphs and under torch.compile; up to 150 s,
#                       whatever cells finish are kept) into OUTDIR/graphs.{json,md,txt}
#   GPU_CHECK_GRAPHS_IMPLS  that run's --impls (default: all six of the compile preset)
#   GPU_CHECK_PROBE     1: after the benchmark (and ncu), also run bench/gpu_probe.py (per-step costs against
#                       cuDNN, the exchange variants, the barrier floor; up to 150 s) into OUTDIR/probe.txt
#   GPU_CHECK_NCU       1: right after the benchmark, profile the anchor's recurrence kernels
#                       (bf16 LSTM B=16 T=1024 H=768: an inference forward, a training forward and its backward) with
#                       Nsight Compute's stall sampling (--clock-control none), into
#                       OUTDIR/ncu-anchor.ncu-rep, OUTDIR/ncu-details.csv (warp states per kernel)
#                       and OUTDIR/ncu-source.csv (stall samples per SASS line); up to 150 s
#   GPU_CHECK_DEADLINE  seconds the whole run may take (default 570): each step's time limit is cut
#                       to what is left, and a step with less than 20 s left is not started (it
#                       counts as failed, "out of time"). A lent GPU machine runs one command for at
#                       most 600 s, and whatever the run has written by then is what comes back.
# Steps: build, import, then the tests beside the sanitizers (memcheck, racecheck, synccheck, one
# after another), then the benchmark alone. The tests and the sanitizers only judge correctness, so
# they share the GPU: on a lease of 15 minutes that saves minutes. Nothing runs beside the
# benchmark, whose timings it would spoil.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1/logs" || exit 2
OUT=$(cd "$1" && pwd)
cd "$REPO" || exit 2
PYTHON=${PYTHON:-python3}
BUILD_MODE=${GPU_CHECK_BUILD:-pip}
PRESET=${GPU_CHECK_PRESET:-gpu}
PYTEST_K=${GPU_CHECK_PYTEST_K:-cuda and not cuda_emu}
SKIP=" ${GPU_CHECK_SKIP:-} "
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1

STATUS="$OUT/status.md"
DEADLINE_S=${GPU_CHECK_DEADLINE:-570}
END_AT=$(( $(date +%s) + DEADLINE_S ))
printf '| step | status | seconds | log |\n|---|---|---|---|\n' > "$STATUS"

# run_step NAME TIMEOUT_S COMMAND...: runs the command with a time limit, logs it, records status.
run_step() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/logs/$name.log" status start rc
  if [[ "$SKIP" == *" $name "* ]]; then
    echo "== $name: skipped (GPU_CHECK_SKIP)"
    printf '| %s | skipped | 0 | |\n' "$name" >> "$STATUS"
    return 0
  fi
  local left=$(( END_AT - $(date +%s) - 25 ))  # a timed-out step gets 20 s more to end
  if [ "$left" -lt 20 ]; then
    echo "== $name: not started, out of time (GPU_CHECK_DEADLINE=${DEADLINE_S}s)"
    printf '| %s | FAILED (not started: out of time) | 0 | |\n' "$name" >> "$STATUS"
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s, log $log)"
  start=$(date +%s)
  # A fresh bash runs the step (functions and variables are exported below), so that timeout can
  # stop the step's whole process group.
  timeout --kill-after=20 "$limit" bash -c '"$@"' "$name" "$@" > "$log" 2>&1 &
  local pid=$!
  wait "$pid"
  rc=$?
  # timeout leads its own process group (pgid = its pid). On a time-out the step's bash dies at
  # once, so timeout returns at once too, and a process that handles or ignores SIGTERM (the
  # benchmark's handler cannot run while it waits on a hung kernel) would outlive the step and
  # share the GPU with the next ones: give the group the same 20 s, then kill what is left.
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    for _ in $(seq 20); do kill -0 -- "-$pid" 2> /dev/null || break; sleep 1; done
  fi
  kill -KILL -- "-$pid" 2> /dev/null
  case $rc in
    0) status=passed ;;
    124|137) status="FAILED (timed out after ${limit}s)" ;;
    5) status="FAILED (exit 5: pytest selected no test)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  printf '| %s | %s | %s | logs/%s.log |\n' "$name" "$status" "$(( $(date +%s) - start ))" "$name" >> "$STATUS"
  echo "   $name: $status"
  [ "$rc" -eq 0 ] || tail -n 25 "$log" | sed 's/^/   | /'
  return "$rc"
}

# --- the toolchain ------------------------------------------------------------------------------
if ! command -v nvcc > /dev/null 2>&1; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$dir/nvcc" ]; then export PATH="$dir:$PATH"; break; fi
  done
fi
SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ] && command -v nvcc > /dev/null 2>&1; then
  candidate="$(dirname "$(command -v nvcc)")/compute-sanitizer"
  [ -x "$candidate" ] && SANITIZER=$candidate
fi
ARCH=${GPU_CHECK_ARCH:-}
if [ -z "$ARCH" ]; then
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' .')
fi
if [ -z "$ARCH" ]; then
  ARCH=$("$PYTHON" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2> /dev/null)
fi
COMMIT=${GPU_CHECK_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2> /dev/null || echo unknown)}
# What the steps below (each a fresh bash) need; the benchmark records the commit from it too.
export REPO OUT PYTHON ARCH SANITIZER PRESET COMMIT
export FUSEDRNN_BENCH_COMMIT=$COMMIT
echo "fusedrnn gpu_check: arch sm_${ARCH:-?}, commit $COMMIT, build mode $BUILD_MODE, output $OUT"

# --- machine file (first, so it exists whatever fails later) -------------------------------------
write_machine() {
  {
    echo "# Machine"
    echo
    echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "- commit: $COMMIT"
    echo "- build: $BUILD_MODE, FUSEDRNN_CUDA_ARCHS=${ARCH:-?}"
    echo "- nvcc: $(nvcc --version 2> /dev/null | tail -n 1)"
    echo "- compute-sanitizer: ${SANITIZER:-not found}"
    echo "- python: $("$PYTHON" --version 2>&1)"
    "$PYTHON" - <<'PY'
import torch
print(f"- torch: {torch.__version__}, CUDA runtime {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- GPU: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
else:
    print("- GPU: torch sees none")
PY
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    echo '```'
  } > "$OUT/machine.md"
  PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$OUT/machine.json" "$COMMIT" <<'PY'
import json, sys
from fusedrnn.bench import machine
info = machine.collect("cuda")
info["commit"] = sys.argv[2]
json.dump(info, open(sys.argv[1], "w"), indent=1)
PY
}
write_machine > "$OUT/logs/machine.log" 2>&1 || echo "   (machine file incomplete: see logs/machine.log)"

# --- build ---------------------------------------------------------------------------------------
build_pip() {
  FUSEDRNN_CUDA=ON FUSEDRNN_CUDA_ARCHS="$ARCH" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v "$REPO"
}
build_cmake() {
  local dir="$REPO/build/gpu-check"
  cmake -S "$REPO" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
    -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" \
    -DFUSEDRNN_MODULE_DIR="$REPO/python/fusedrnn" -DFUSEDRNN_CUDA=ON \
    -DFUSEDRNN_CUDA_ARCHS="$ARCH" -DCMAKE_CUDA_ARCHITECTURES="$ARCH" &&
    cmake --build "$dir" -j "$(nproc)"
}
# Imports the built package from a neutral folder, so the source tree cannot shadow an install.
check_import() {
  (cd "$OUT" && "$PYTHON" -c '
import fusedrnn, fusedrnn._backend as b
print("fusedrnn from", fusedrnn.__file__)
assert b.HAS_CUDA, "fusedrnn._cuda did not load (or torch sees no GPU)"
print("fusedrnn._cuda loaded")')
}

export -f build_pip build_cmake check_import
if [ "$BUILD_MODE" = cmake ]; then
  export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
  run_step build 300 build_cmake
elif [ "$BUILD_MODE" = pip ]; then
  if ! run_step build 300 build_pip; then
    # Keep going on a developer build, so the tests and sanitizers still say something.
    echo "   pip build failed: falling back to a developer cmake build for the remaining steps"
    export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
    run_step build-fallback 300 build_cmake
  fi
else
  echo "GPU_CHECK_BUILD must be pip or cmake, got '$BUILD_MODE'" >&2
  exit 2
fi
if ! run_step import 60 check_import; then
  # Every later step needs fusedrnn._cuda (the tests would only skip, and pass): end here and
  # give the lease back its minutes.
  echo "   fusedrnn._cuda does not load: the GPU steps are not run"
  SKIP="$SKIP tests memcheck racecheck synccheck bench graphs probe ncu "
fi
write_machine > "$OUT/logs/machine.log" 2>&1  # again, now that the native modules are built

# --- tests beside the sanitizers ----------------------------------------------------------------
TEST_TIMEOUT=()
if "$PYTHON" -c 'import pytest_timeout' > /dev/null 2>&1; then
  TEST_TIMEOUT=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-150}" --timeout-method thread)
fi
sanitize() {
  local tool=$1
  shift
  if [ -z "$SANITIZER" ]; then
    echo "compute-sanitizer not found (PATH, next to nvcc)"
    return 1
  fi
  # torch's caching allocator hides an overrun inside its pool: one cudaMalloc per tensor instead.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 50 "$@" \
    "$PYTHON" "$REPO/bench/sanitizer_smoke.py"
}
# racecheck and synccheck only look at fusedrnn's kernels (namespace fusedrnn): cuBLAS and torch
# kernels are not ours to judge, and instrumenting them costs minutes.
# The help text is read whole, whatever the exit status of --help: tested through a pipe into
# grep -q under pipefail, this was false on an H200 (2026-11-27), so the filter was silently off
# and racecheck reported hazards inside cuBLAS's kernels.
KERNEL_FILTER=()
SANITIZER_HELP=$([ -n "$SANITIZER" ] && "$SANITIZER" --help 2>&1 || true)
if [[ "$SANITIZER_HELP" == *--kernel-name* ]]; then
  KERNEL_FILTER=(--kernel-name kns=fusedrnn)
fi
echo "== racecheck and synccheck instrument: ${KERNEL_FILTER[*]:-every kernel (no --kernel-name)}"
export -f sanitize
run_step tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider -k "$PYTEST_K" "${TEST_TIMEOUT[@]}" \
  --junitxml="$OUT/pytest-cuda.xml" "$REPO/tests" &
TESTS_PID=$!
(
  hung() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; }
  run_step memcheck 150 sanitize memcheck
  hung $? && SKIP="$SKIP racecheck synccheck "
  run_step racecheck 150 sanitize racecheck --racecheck-report hazard "${KERNEL_FILTER[@]}"
  hung $? && SKIP="$SKIP synccheck "
  run_step synccheck 120 sanitize synccheck "${KERNEL_FILTER[@]}"
) &
SANITIZERS_PID=$!
wait "$TESTS_PID" "$SANITIZERS_PID"

# --- benchmark, alone on the GPU ------------------------------------------------------------------
bench() {
  local plot=() impls=()
  if "$PYTHON" -c 'import matplotlib' > /dev/null 2>&1; then
    plot=(--plot "$OUT/bench.png")
  fi
  [ -n "${GPU_CHECK_IMPLS:-}" ] && impls=(--impls "$GPU_CHECK_IMPLS")
  # From OUT, so an installed package is what runs (PYTHONPATH still points at python/ in cmake mode).
  (cd "$OUT" && "$PYTHON" -m fusedrnn.bench --device cuda --preset "$PRESET" "${impls[@]}" \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md" "${plot[@]}")
}
export -f bench
run_step bench 300 bench
[ -f "$OUT/logs/bench.log" ] && cp "$OUT/logs/bench.log" "$OUT/bench.txt"

# --- stall sampling of the anchor (optional) -----------------------------------------------------
ncu_anchor() {
  local ncu_bin
  ncu_bin=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  [ -x "$ncu_bin" ] || { echo "ncu not found"; return 1; }
  (cd "$OUT" && "$ncu_bin" --clock-control none -k regex:recurrence_ --launch-skip 1 \
    --launch-count 3 --section WarpStateStats --section SourceCounters -f -o "$OUT/ncu-anchor" \
    "$PYTHON" "$REPO/bench/gpu_probe.py" anchor) || return 1
  "$ncu_bin" -i "$OUT/ncu-anchor.ncu-rep" --page details --csv > "$OUT/ncu-details.csv" &&
    "$ncu_bin" -i "$OUT/ncu-anchor.ncu-rep" --page source --csv --print-source sass \
      > "$OUT/ncu-source.csv"
}
export -f ncu_anchor
if [ "${GPU_CHECK_NCU:-0}" = 1 ]; then
  run_step ncu 150 ncu_anchor
fi

# --- per-step probe (optional) ---------------------------------------------------------------------
probe() {
  (cd "$OUT" && "$PYTHON" "$REPO/bench/gpu_probe.py")
}
export -f probe
if [ "${GPU_CHECK_PROBE:-0}" = 1 ]; then
  run_step probe 150 probe
  [ -f "$OUT/logs/probe.log" ] && cp "$OUT/logs/probe.log" "$OUT/probe.txt"
fi

# --- CUDA graphs and torch.compile (optional) ---------------------------------------------------
graphs() {
  local impls=()
  [ -n "${GPU_CHECK_GRAPHS_IMPLS:-}" ] && impls=(--impls "$GPU_CHECK_GRAPHS_IMPLS")
  (cd "$OUT" && "$PYTHON" -m fusedrnn.bench --device cuda --preset compile "${impls[@]}" \
    --json "$OUT/graphs.json" --markdown "$OUT/graphs.md")
}
export -f graphs
if [ "${GPU_CHECK_GRAPHS:-0}" = 1 ]; then
  run_step graphs 150 graphs
  [ -f "$OUT/logs/graphs.log" ] && cp "$OUT/logs/graphs.log" "$OUT/graphs.txt"
fi

# --- summary -------------------------------------------------------------------------------------
{
  echo "# fusedrnn gpu_check"
  echo
  cat "$OUT/machine.md" 2> /dev/null
  echo
  echo "## Steps"
  echo
  cat "$STATUS"
  if [ -f "$OUT/bench.md" ]; then
    echo
    echo "## Benchmark ($PRESET preset)"
    echo
    sed '1,/^```$/d' "$OUT/bench.md" | sed '1,/^```$/d'
  fi
  if [ -f "$OUT/graphs.md" ]; then
    echo
    echo "## CUDA graphs and torch.compile (compile preset)"
    echo
    sed '1,/^```$/d' "$OUT/graphs.md" | sed '1,/^```$/d'
  fi
} > "$OUT/summary.md"
echo
cat "$STATUS"
# The steps ran in subshells too, so the failures are counted from the status table.
FAILED=$(grep -c 'FAILED' "$STATUS")
if [ "$FAILED" -ne 0 ]; then
  echo "gpu_check: $FAILED step(s) failed; see $OUT/status.md and $OUT/logs/" >&2
  exit 1
fi
echo "gpu_check: every step passed; results in $OUT"
