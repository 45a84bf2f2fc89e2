#!/usr/bin/env bash
# The ONE command for a GPU session: versions -> (optional) CUDA extension JIT build -> GPU tests -> benchmarks,
# with logs and results copied to $OUT and a short summary printed LAST (the device tool returns only the tail).
#
#   scripts/gpu_suite.sh [--quick] [--only NAME[,NAME]] [--tests "PATH ..."] [--no-tests] [--no-bench] [--sanitize]
#                        [--autotune] [--jobs N] [-- extra pytest args]
#   --sanitize: the CUDA C++ files' test_compute_sanitizer tests (memcheck / racecheck / synccheck / initcheck over
#               small shapes of every CUDA kernel family), in the background while the other tests run
#   --autotune: let the GPU tests autotune too. By default they run with VITKERN_AUTOTUNE=0 (each Triton launch runs
#               its first config; vitkern/kernels/triton/tuning.py): autotuning compiles every config of every
#               (shape, dtype, flags) key, minutes of compiling over hundreds of test shapes. The *_every_config tests
#               check the other configs; the benchmarks always autotune.
#   --jobs N:   pytest workers (default 8). With pytest-xdist (in the GPU image) the tests are dealt out in chunks
#               (`-n N --dist worksteal`); without it, the files go round-robin to N pytest processes (heavy first).
#               Triton compiles on one CPU core per process, and the GPU tests are mostly compilation on a fresh
#               machine; xdist replaces a crashed worker, a round-robin crash ends one process only. A test
#               whose kernel faults ends its process (its CUDA context is gone; vitkern.testing.pytest_cuda_context),
#               so the tests after it run in a fresh worker.
#
#   --step N:   the GPU session's plan (benchmarks/NOTES.md), one device call per step; arguments after it are
#               added (e.g. --step 1 --jobs 12):
#                 1 kernels' GPU parity, Triton and CUDA C++, + CUDA sanitizers
#                 2 op benchmarks (table off: the `vitkern` rows are Triton's)
#                 3 model integration at real size + end-to-end model benchmarks (--quick)
#                 4 end-to-end model benchmarks, the full list (a later session's)
#
# The whole suite outgrows one 10-minute device command as op families land: split it per family, e.g.
#   scripts/gpu_suite.sh --only layernorm --tests "tests/test_layer_norm.py tests/test_layer_norm_cuda.py tests/test_extension.py"
#
# Env: VITKERN_BUILD_CUDA=1   JIT-build the CUDA extension first (vitkern._extension.load_jit; default 1, 0 skips)
#      VITKERN_COMMIT=<sha>   recorded in the results when the tree has no .git (the GPU machine gets a copy)
#      OUT=<dir>              where logs + a results tarball go (the device tool sets it)
#      SUITE_BUDGET_S=570     wall-clock budget for the whole script (a device command may run 600 s)
#      TEST_CAP_S=240         the tests' cap when benchmarks follow in the same call (they keep the rest)
#      PYTHON=python3
# No pip, no network: it uses the python3 that already has torch/triton/timm/transformers/pytest.
# Exit status: 1 if the GPU tests (or the sanitizer tests) failed, 2 if the tests passed but the benchmark run crashed or timed out, else 0.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# the tests' `ext` fixture JIT-loads the extension when the built one is missing or stale (vitkern._extension)
export VITKERN_BUILD_CUDA="${VITKERN_BUILD_CUDA:-1}"
PY="${PYTHON:-python3}"
budget="${SUITE_BUDGET_S:-570}"
# --step N expands to the plan's arguments for that call (kept here so the device command stays short)
kernel_tests="tests/test_attention.py tests/test_window_attention.py tests/test_ln_mlp.py tests/test_patch_embed.py
  tests/test_layer_norm.py tests/test_linear_residual.py tests/test_attention_cuda.py tests/test_window_attention_cuda.py
  tests/test_ln_mlp_cuda.py tests/test_patch_embed_cuda.py tests/test_layer_norm_cuda.py tests/test_extension.py
  tests/test_op_layouts.py tests/test_cuda_context.py tests/test_parallel_compile.py"
model_tests="tests/test_integration_timm.py tests/test_integration_torchvision.py tests/test_integration_hf.py
  tests/test_cli_bench.py"
cuda_test_files="tests/test_attention_cuda.py tests/test_window_attention_cuda.py tests/test_ln_mlp_cuda.py
  tests/test_patch_embed_cuda.py tests/test_layer_norm_cuda.py"
if [ "${1:-}" = "--step" ]; then
  step="${2:-}"; shift 2 || { echo "--step needs a number (1-4)" >&2; exit 2; }
  case "$step" in
    1) set -- --no-bench --sanitize --tests "$(echo $kernel_tests)" "$@" -- -m "gpu and not slow" ;;
    2) export VITKERN_SPEED_TABLE=0
       set -- --no-tests --only layernorm,attention,window_attention,ln_mlp,linear_residual,patch_embed "$@" ;;
    3) set -- --tests "$(echo $model_tests)" --only models --quick "$@" ;;
    4) set -- --no-tests --only models "$@" ;;
    *) echo "--step: expected 1, 2, 3 or 4, got '$step'" >&2; exit 2 ;;
  esac
  echo "[gpu_suite] step $step: $*"
fi
quick=() only=() run_tests=1 run_bench=1 run_sanitizer=0 test_autotune=0 jobs=8 pytest_extra=() test_paths=(tests/)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick) ;;
    --only) only=(--only "$2"); shift ;;
    --tests) read -r -a test_paths <<<"$2"; shift ;;
    --no-tests) run_tests=0 ;;
    --no-bench) run_bench=0 ;;
    --sanitize) run_sanitizer=1 ;;
    --autotune) test_autotune=1 ;;
    --jobs) jobs="$2"; shift ;;
    --) shift; pytest_extra=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

logs="$(mktemp -d /tmp/vitkern-suite.XXXXXX)"
left() { echo $(( budget - SECONDS )); }
# cap_for STEP_CAP RESERVE: seconds this step may run (its cap, or what is left minus what later steps need)
cap_for() { local l=$(( $(left) - $2 )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
# run_capped CAP LOG CMD...: run under `timeout` (TERM, then KILL 10 s later); too little time left -> rc 124
run_capped() {
  local cap=$1 log=$2; shift 2
  if [ "$cap" -lt 20 ]; then echo "not started: only ${cap}s of the suite budget left" >"$log"; return 124; fi
  timeout -k 10 "$cap" "$@" >"$log" 2>&1
}
hr() { printf '%*s\n' 100 '' | tr ' ' '='; }
# count_line LOG: pytest's last count line in LOG ("3 passed, 2 skipped in 4.1s"), for the summary
count_line() { grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$1" | tail -n 1; }

hr; echo "vitkern GPU suite  $(date -u +%Y-%m-%dT%H:%M:%SZ)  repo=$repo  budget=${budget}s"
{
  timeout 60 "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}  CUDA {torch.version.cuda}  cuDNN {torch.backends.cudnn.version()}  "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}  sm_{p.major}{p.minor}  SMs {p.multi_processor_count}  {p.total_memory / 2**30:.0f} GiB")
for m in ("triton", "timm", "transformers", "torchvision", "pytest", "numpy", "ninja"):
    try:
        print(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"{m} MISSING ({type(e).__name__})")
EOF
  echo "commit: $(git -C "$repo" rev-parse HEAD 2>/dev/null || echo "${VITKERN_COMMIT:-unknown} (no .git)")"
  nvidia-smi -L 2>&1 || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=driver_version,pstate,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit \
    --format=csv 2>/dev/null || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH"
} 2>&1 | tee "$logs/env.txt"

build_rc=skipped
if [ "${VITKERN_BUILD_CUDA:-1}" = "1" ]; then
  hr; cap=$(cap_for 240 300); echo "JIT-building the CUDA extension (cap ${cap}s) ..."
  run_capped "$cap" "$logs/build.log" "$PY" -c "import vitkern._extension as e; print(e.load_jit())"
  build_rc=$?
  if [ "$build_rc" -ne 0 ]; then
    if grep -q "No module named 'vitkern._extension'" "$logs/build.log"; then
      build_rc="absent (vitkern._extension not written yet)"
    fi
    echo "CUDA build: rc=$build_rc"; tail -n 20 "$logs/build.log"
  else
    echo "CUDA build: ok"
  fi
fi

# pytest-xdist's distribution: worksteal (>= 3.2) deals contiguous chunks (tests of one file share their Triton
# compiles, which each worker otherwise repeats) and steals from the longest queue at the end; load otherwise
have_xdist=0 dist=load
"$PY" -c "import xdist" 2>/dev/null && have_xdist=1
"$PY" -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2>/dev/null \
  && dist=worksteal
per_test=()
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
# a hung kernel blocks in C, where the signal method's alarm never reaches Python: under xdist the thread method
# ends the worker instead, and xdist runs the rest in a fresh one (crashes count towards a function's cap)
[ "${#per_test[@]}" -gt 0 ] && [ "$have_xdist" = 1 ] && per_test+=(--timeout-method thread)

sanitizer_rc=skipped sanitizer_pid=""
if [ "$run_sanitizer" = 1 ]; then  # in the background, beside the other tests: the GPU work is small shapes
  cap=$(cap_for 420 $([ "$run_bench" = 1 ] && echo 150 || echo 30))
  san_files=()
  for f in $cuda_test_files; do [ -f "$f" ] && san_files+=("$f"); done
  san_workers=()
  [ "$have_xdist" = 1 ] && san_workers=(-n 4 --dist "$dist")
  hr; echo "compute-sanitizer tests in the background (cap ${cap}s): ${san_files[*]}"
  # each test runs one tool over a whole workload in a subprocess: minutes under racecheck, hence its own timeout
  run_capped "$cap" "$logs/sanitizer.log" "$PY" -m pytest -m gpu -k test_compute_sanitizer "${san_files[@]}" \
    "${san_workers[@]}" -q -rfEs -p no:cacheprovider $([ "${#per_test[@]}" -gt 0 ] && echo --timeout 400) &
  sanitizer_pid=$!
fi

pytest_rc=skipped
if [ "$run_tests" = 1 ]; then
  # with benchmarks to follow, the tests get TEST_CAP_S and leave them 150 s; alone, the whole budget
  if [ "$run_bench" = 1 ]; then cap=$(cap_for "${TEST_CAP_S:-240}" 150); else cap=$(cap_for 100000 30); fi
  hr; echo "pytest -m gpu (cap ${cap}s) ..."
  files=()
  for p in "${test_paths[@]}"; do
    if [ -d "$p" ]; then files+=("$p"/test_*.py); else files+=("$p"); fi
  done
  [ "$jobs" -lt 1 ] && jobs=1
  # --autotune: each process compiles a new key's configs on threads (vitkern/kernels/triton/tuning.py); share the
  # cores out between the processes instead of starting 16 threads in each
  compile_threads=$(( $(nproc) / jobs )); [ "$compile_threads" -lt 1 ] && compile_threads=1
  compile_threads="${VITKERN_COMPILE_THREADS:-$compile_threads}"
  pytest_counts=()  # "process g: rc=.. <pytest's last count line>", for the summary too
  if [ "$have_xdist" = 1 ]; then
    echo "tests autotune: VITKERN_AUTOTUNE=$test_autotune; ${#files[@]} files, pytest-xdist: $jobs workers, $dist"
    VITKERN_AUTOTUNE=$test_autotune VITKERN_COMPILE_THREADS=$compile_threads run_capped "$cap" "$logs/pytest.log" "$PY" -m pytest -m gpu "${files[@]}" \
      -n "$jobs" --dist "$dist" --max-worker-restart 200 -q -rfEs -p no:cacheprovider "${per_test[@]}" \
      "${pytest_extra[@]}"
    pytest_rc=$?
    [ "$pytest_rc" = 124 ] && echo "pytest TIMED OUT after ${cap}s" | tee -a "$logs/pytest.log"
    pytest_counts+=("xdist: rc=$pytest_rc  $(count_line "$logs/pytest.log")")
    echo "  ${pytest_counts[-1]}"
  else
    [ "$jobs" -gt "${#files[@]}" ] && jobs=${#files[@]}
    echo "tests autotune: VITKERN_AUTOTUNE=$test_autotune; ${#files[@]} files in $jobs pytest processes (no xdist)"
    pids=()
    for ((g = 0; g < jobs; g++)); do
      group=()
      for ((i = g; i < ${#files[@]}; i += jobs)); do group+=("${files[$i]}"); done
      echo "  process $g: ${group[*]}"
      VITKERN_AUTOTUNE=$test_autotune VITKERN_COMPILE_THREADS=$compile_threads run_capped "$cap" "$logs/pytest.$g.log" \
        "$PY" -m pytest -m gpu "${group[@]}" -q -rfEs -p no:cacheprovider "${per_test[@]}" "${pytest_extra[@]}" &
      pids+=($!)
    done
    pytest_rc=5  # pytest's "nothing collected" unless a process says otherwise; the first real failure wins
    for ((g = 0; g < jobs; g++)); do
      wait "${pids[$g]}"; rc=$?
      [ "$rc" = 124 ] && echo "pytest process $g TIMED OUT after ${cap}s" | tee -a "$logs/pytest.$g.log"
      if [ "$rc" != 5 ] && { [ "$pytest_rc" = 5 ] || [ "$pytest_rc" = 0 ]; }; then pytest_rc=$rc; fi
      { echo "===== pytest process $g (rc=$rc)"; cat "$logs/pytest.$g.log"; } >>"$logs/pytest.log"
      pytest_counts+=("process $g: rc=$rc  $(count_line "$logs/pytest.$g.log")")
      echo "  ${pytest_counts[-1]}"
    done
  fi
fi

if [ -n "$sanitizer_pid" ]; then
  wait "$sanitizer_pid"; sanitizer_rc=$?
  [ "$sanitizer_rc" = 124 ] && echo "compute-sanitizer tests TIMED OUT" | tee -a "$logs/sanitizer.log"
  echo "compute-sanitizer tests: rc=$sanitizer_rc  $(count_line "$logs/sanitizer.log")"
fi

bench_rc=skipped results=""
if [ "$run_bench" = 1 ]; then
  hr; cap=$(cap_for 100000 25); echo "benchmarks (cap ${cap}s) ..."
  # run_all stops starting cases 30 s before the cap, so it normally ends by itself and writes its summary
  run_capped "$cap" "$logs/bench.log" \
    "$PY" -m benchmarks.run_all "${quick[@]}" "${only[@]}" --total-budget-s $(( cap > 60 ? cap - 30 : cap / 2 ))
  bench_rc=$?
  [ "$bench_rc" = 124 ] && echo "benchmarks TIMED OUT after ${cap}s" | tee -a "$logs/bench.log"
  results="$(sed -n 's/^RESULTS_DIR=//p' "$logs/bench.log" | tail -n 1)"
  [ "$bench_rc" != 0 ] && tail -n 30 "$logs/bench.log"
fi

if [ -n "${OUT:-}" ]; then  # the device tool returns <= 8 files, 16 MiB each, <= 2 folder levels
  mkdir -p "$OUT"
  for f in env.txt build.log pytest.log sanitizer.log bench.log; do
    [ -f "$logs/$f" ] && tail -c 15000000 "$logs/$f" >"$OUT/$f"
  done
  if [ -n "$results" ] && [ -d "$results" ]; then
    cp "$results/summary.md" "$OUT/summary.md" 2>/dev/null
    tar -czf "$OUT/results.tar.gz" -C "$(dirname "$results")" "$(basename "$results")"
  fi
fi

hr; echo "SUMMARY  ($(date -u +%H:%M:%SZ), ${SECONDS}s)"
echo "CUDA build: $build_rc"
if [ "$pytest_rc" != skipped ]; then
  echo "pytest -m gpu: rc=$pytest_rc"
  printf '  %s\n' "${pytest_counts[@]}"
  grep -E '^(FAILED|ERROR) ' "$logs/pytest.log" | head -n 15
  # all failed cases, counted per test function (the lines above are only the first ones); a case that ended its
  # worker is reported twice (its failure, then xdist's "crashed"): each case counts once
  by_function="$(grep -E '^(FAILED|ERROR) ' "$logs/pytest.log" | sed -E 's/^(FAILED|ERROR) ([^ ]*).*/\2/' \
    | sort -u | sed -E 's/\[.*//' | uniq -c | sort -rn | head -n 25)"
  [ -n "$by_function" ] && { echo "failures by test function:"; echo "$by_function"; }
  # kernel faults: each ended its process (vitkern/testing/pytest_cuda_context.py); the first ones, deduplicated
  grep -oE 'the CUDA context was lost in [^;]*' "$logs/pytest.log" | sort -u | head -n 8
fi
echo "compute-sanitizer: rc=$sanitizer_rc"
[ -f "$logs/sanitizer.log" ] && grep -E '^(FAILED|ERROR) ' "$logs/sanitizer.log" | head -n 8
echo "benchmarks: rc=$bench_rc  results=${results:-none}${OUT:+  (copied to \$OUT: results.tar.gz, summary.md, logs)}"
if [ -n "$results" ] && [ -f "$results/summary.md" ]; then cat "$results/summary.md"; fi

# pytest rc 5 = nothing collected (no gpu tests yet): not a failure
case "$pytest_rc" in 0|5|skipped) ;; *) exit 1 ;; esac
case "$sanitizer_rc" in 0|5|skipped) ;; *) exit 1 ;; esac
case "$bench_rc" in 0|skipped) exit 0 ;; *) exit 2 ;; esac
