#!/usr/bin/env bash
# Builds the emulator's standalone test binaries (target emu_tests: emu_selftest and any kernel
# tests registered with it) twice, with AddressSanitizer+UBSan and with ThreadSanitizer, and runs
# them through CTest. Exits non-zero on any sanitizer report or test failure.
#
#   csrc/emu/run_sanitizers.sh [address|thread ...]     (default: both)
# Environment: BUILD_ROOT (default <repo>/build), JOBS (default 2), PYTHON (default /work/venv/bin/python
# if present, else python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build_root="${BUILD_ROOT:-$repo/build}"
jobs="${JOBS:-2}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x /work/venv/bin/python ]]; then python=/work/venv/bin/python; else python=python3; fi
fi
sanitizers=("$@")
[[ ${#sanitizers[@]} -eq 0 ]] && sanitizers=(address thread)

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}"

status=0
for sanitizer in "${sanitizers[@]}"; do
  case "$sanitizer" in
    address|thread) ;;
    *) echo "run_sanitizers.sh: unknown sanitizer '$sanitizer' (expected address or thread)" >&2; exit 2 ;;
  esac
  build="$build_root/emu-$sanitizer"
  echo "== $sanitizer: configuring $build"
  cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DPython_EXECUTABLE="$python" \
    -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" \
    -DFUSEDRNN_CUDA=OFF -DFUSEDRNN_EMU=ON -DFUSEDRNN_EMU_SANITIZE="$sanitizer" >/dev/null
  echo "== $sanitizer: building emu_tests"
  cmake --build "$build" -j "$jobs" --target emu_tests
  echo "== $sanitizer: running"
  if ! ctest --test-dir "$build/csrc/emu" --output-on-failure; then
    echo "== $sanitizer: FAILED" >&2
    status=1
  else
    echo "== $sanitizer: clean"
  fi
  if [[ "$sanitizer" == thread ]]; then
    # The probe has a cross-warp race that only __syncwarp "orders": TSan must report it, or the
    # emulator is adding happens-before edges that a GPU does not have.
    if TSAN_OPTIONS="halt_on_error=1" "$build/csrc/emu/emu_tsan_probe" >"$build/tsan_probe.log" 2>&1 \
        || ! grep -q "data race" "$build/tsan_probe.log"; then
      echo "== thread: FAILED: emu_tsan_probe's deliberate race was not reported (see $build/tsan_probe.log)" >&2
      status=1
    else
      echo "== thread: the deliberate cross-warp race of emu_tsan_probe is reported, as it must be"
    fi
  fi
done
exit $status
