#!/usr/bin/env bash
# GPU check on a fresh machine with torch, triton, peft, pytest, nvcc, cmake,
# ninja and pybind11 installed and no network.  From the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      (default benchmarks/out/gpu_check)
#
# 1. versions and the card (nvidia-smi);
# 2. builds the package with the CUDA extension (CPOLY_BUILD_CUDA=1
#    pip install --no-build-isolation --no-deps -e .); on failure it says so and
#    goes on with Triton (the tree is on PYTHONPATH);
# 3. the parity tests on the GPU: python -m pytest tests/ -q --maxfail=25 (a broken backend does not hide the other);
#    then compute-sanitizer memcheck and racecheck over benchmarks/sanitize_cuda.py (CUDA backend);
# 4. the benchmark CLI on the OP_SPEC §5 shapes (no torch.compile anchor, short
#    repetitions, a time budget), which prints one table and writes bench.json,
#    bench.csv, table.txt and bench.png to OUT_DIR.
# Every step runs under `timeout`; the whole script stays under
# CPOLY_CHECK_BUDGET_S seconds (default 450, i.e. < 8 minutes on an H100).
# Logs: OUT_DIR/check.log (everything but the build) and build.log.  Exit status:
# 0 when the tests, the sanitizers (where found) and the benchmark passed, 1
# otherwise (the build may fail).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/out/gpu_check}
BUDGET=${CPOLY_CHECK_BUDGET_S:-450}
PY=${PYTHON:-$(command -v python || command -v python3)}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/check.log"
: > "$LOG"
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5  # fewer progress-bar redraws in the log

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
# step NAME CAP_S RESERVE_S CMD...: run CMD under timeout min(CAP, time left - RESERVE); status in $STATUS.
step() {
    local name=$1 cap=$2 reserve=$3; shift 3
    local t=$(( $(left) - reserve )); (( t > cap )) && t=$cap
    if (( t < 10 )); then say "== $name: SKIPPED (only $(left) s of the budget left)"; STATUS=124; return; fi
    say "== $name (timeout ${t} s)"
    local t0=$(date +%s)
    # SIGINT first: the benchmark then writes what it measured; SIGKILL 10 s later.
    timeout -s INT -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
    STATUS=${PIPESTATUS[0]}
    say "== $name: exit $STATUS in $(( $(date +%s) - t0 )) s$([ "$STATUS" = 124 ] && echo ' (TIMED OUT)')"
}

step "versions" 60 400 bash -c '
    nvidia-smi
    '"$PY"' -c "import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name(0))"
    for m in triton peft transformers pytest pybind11; do '"$PY"' -c "import $m; print(\"$m\", $m.__version__)" || echo "$m: not importable"; done
    nvcc --version | tail -n 2; cmake --version | head -n 1; echo "ninja $(ninja --version)"'

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    say "WARNING: torch sees no GPU: the tests skip their GPU parts and the benchmark runs tiny CPU shapes"
fi
if [ -z "${CPOLY_CUDA_ARCHS:-}" ]; then
    CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    [ -n "$CAP" ] && export CPOLY_CUDA_ARCHS=$CAP  # build for this card only (faster)
fi
step "build (CUDA extension, archs ${CPOLY_CUDA_ARCHS:-default}; log in $OUT_DIR/build.log)" 180 240 bash -c \
    'CPOLY_BUILD_CUDA=1 "$0" -m pip install --no-build-isolation --no-deps -v -e . > "$1" 2>&1' "$PY" "$OUT_DIR/build.log"
BUILD=$STATUS
if [ "$BUILD" != 0 ]; then
    say "BUILD FAILED (exit $BUILD): going on with Triton from the tree. Last lines of $OUT_DIR/build.log:"
    tail -n 25 "$OUT_DIR/build.log" | tee -a "$LOG"
fi
step "backends" 30 200 "$PY" -c "import cpoly_kernels as ck; print(ck.backends())"

step "parity tests on the GPU" 220 210 "$PY" -m pytest tests/ -q --maxfail=25 -p no:cacheprovider
TESTS=$STATUS

# compute-sanitizer over a subset of CUDA-backend calls (benchmarks/sanitize_cuda.py), our kernels only.
SAN=$(command -v compute-sanitizer || { [ -x /usr/local/cuda/bin/compute-sanitizer ] && echo /usr/local/cuda/bin/compute-sanitizer; } || true)
MEMCHECK=skipped RACECHECK=skipped
if [ -n "$SAN" ]; then
    step "compute-sanitizer memcheck (CUDA backend)" 75 130 "$SAN" --tool memcheck --kernel-name kns=cpoly \
        --error-exitcode 1 "$PY" -m benchmarks.sanitize_cuda
    MEMCHECK=$STATUS
    step "compute-sanitizer racecheck (CUDA backend)" 45 90 "$SAN" --tool racecheck --kernel-name kns=cpoly \
        --error-exitcode 1 "$PY" -m benchmarks.sanitize_cuda
    RACECHECK=$STATUS
else
    say "== compute-sanitizer not found: memcheck and racecheck skipped"
fi

CASES=d4096,d4096-mhr8,d4096-many-short,d4096-r64,t5l-paper-gathered,t5l-paper-dense,glm10b-qkv-paper,mlp-up,superni-1600,decode-serving
BENCH_S=$(( $(left) - 10 ))
step "benchmark (OP_SPEC §5 shapes)" "$BENCH_S" 5 "$PY" -m benchmarks.run --cases "$CASES" --compile none \
    --warmup-ms 5 --rep-ms 25 --time-budget $(( BENCH_S - 60 > 10 ? BENCH_S - 60 : 10 )) --out "$OUT_DIR"
BENCH=$STATUS

say "== summary: build exit $BUILD, tests exit $TESTS, memcheck $MEMCHECK, racecheck $RACECHECK, benchmark exit $BENCH, $(( $(date +%s) - START )) s; results in $OUT_DIR"
[ "$TESTS" = 0 ] && [ "$BENCH" = 0 ] && [ "$MEMCHECK" != 1 ] && [ "$RACECHECK" != 1 ]
