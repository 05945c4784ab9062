#!/usr/bin/env bash
# The GPU checks in one prepared script, for a lent CUDA machine (bare image: torch, triton, pytest, no network).
#
#   bash benchmarks/gpu_check.sh STAGE...      stages, in the order given (names checked before any runs):
#     setup   install the carried wheels (.gpu/whl: a kexue_fast cp3XX wheel built elsewhere, normflows, FrEIA) into a
#             fresh /tmp/kexue_site, and check that the installed package is this checkout's (a stale wheel fails the
#             stage); build kexue_fast here instead when the carried wheel will not import and scikit-build-core and
#             pybind11 are there to build it. When setup fails, the later stages are skipped.
#     test    every test file that runs CUDA paths when a GPU is present (`gpu` tests included, slow ones not), or
#             the files named in TEST_FILES (names under tests/, space-separated); TEST_WORKERS (8), TEST_THREADS
#             (1 per worker), TEST_TIMEOUT (300 s), TEST_K (a pytest -k expression), TEST_ARGS (more pytest
#             arguments, split on spaces); TEST_LOG names the log (tests.log), so that several runs keep theirs
#     bench   python -m kexue_fast.bench --device cuda for the GPU suites (BENCH_SUITES; hsic with --full: its n = 10⁶
#             goal; ortho with --full: 5 rounds of the step, whose overhead spread over up to 60 points between the
#             rounds of one run on an H200, benchmarks/results/som-sweep-cuda.md); BENCH_TIMEOUT (150 s) per suite
#     jose    the JoSE GPU trainer's word similarity and training speed (benchmarks/jose_quality.py --device cuda)
#             on the carried corpus (.gpu/corpus.txt.gz) and datasets (.gpu/wordsim353.tsv, .gpu/simlex999.txt)
#     sweep   the fused SOM kernels under each launch setting, their error, and the CNN step with the fastest
#             accurate ones (benchmarks/som_profile.py --sweep), into logs/som-sweep.log; SWEEP_TIMEOUT (240 s),
#             SWEEP_SETTINGS (a JSON list of settings instead of the script's list)
#     profile where the fused SOM path spends a CNN step (benchmarks/som_profile.py: device and host time per
#             operator, host synchronizations, Python hot spots), into logs/som-profile.log; PROFILE_TIMEOUT (120 s)
#     hostcost the host's µs per call of the SOM Triton route's pieces at a host-bound batch (som_profile.py
#             --host-costs), into logs/som-host.log; HOSTCOST_TIMEOUT (90 s)
#     ncu     Nsight Compute on the fused SOM Gram and backward kernels, one launch each per setting (som_profile.py
#             --kernels-once; NCU_SETTINGS, a JSON list of settings; --clock-control none): throughput, occupancy,
#             launch statistics, warp stalls, memory and compute use, into logs/som-ncu.log; NCU_TIMEOUT (180 s)
#
# DEADLINE_S (seconds from the start, default 570: under the device tool's 600 s per command) caps every stage's
# timeout at the time left, so that the command ends by itself and what it wrote comes back.
#
# Preparing .gpu/ here (git-excluded: `echo /.gpu/ >> .git/info/exclude`), for the machine's CPython (3.12 there;
# rebuild the wheel at every commit you check: setup refuses a wheel whose files differ from the checkout's):
#   rm -f .gpu/whl/kexue_fast-*.whl && PYENV_VERSION=3.12.1 CMAKE_BUILD_PARALLEL_LEVEL=2 \
#     python3.12 -m pip wheel -q --no-deps -w .gpu/whl .          # kexue_fast, C++ core included (~3.5 min)
#   pip download --no-deps -d /tmp/sd normflows FrEIA && pip wheel --no-deps -w .gpu/whl /tmp/sd/*
#   gzip -c "$(python -c 'from kexue_fast.datasets import offline_corpus as c; print(c())')" > .gpu/corpus.txt.gz
#   cp <gensim>/test/test_data/{wordsim353.tsv,simlex999.txt} .gpu/
# and name .gpu in the device call's carry.
#
# Everything runs outside the checkout (so the installed package, not the source tree, is imported). Logs and results
# are written straight into $OUT/logs and $OUT/results (a command cut off mid-stage still returns what it wrote), and
# $OUT/summary.txt lists each stage's exit status; the script exits non-zero when a stage failed. Set KEXUE_GIT_SHA to
# the checkout's sha: the tree travels without .git.
set -u
START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/kexue_gpu_out}
PY=${PY:-python3}
WORK=/tmp/kexue_gpu
LOGS="$OUT/logs"
RESULTS="$OUT/results"
SITE=/tmp/kexue_site
mkdir -p "$WORK" "$LOGS" "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
cd "$WORK" || exit 1

# The timeout for a stage: its own, capped at the time left before DEADLINE_S (at least 10 s).
budget() {
  local left=$(( ${DEADLINE_S:-570} - ($(date +%s) - START) - 5 ))
  [ "$left" -lt 10 ] && left=10
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# Whether the installed package's Python files are this checkout's (the wheel was built at another commit if not).
installed_matches_checkout() {
  local installed
  installed=$($PY -c "import kexue_fast, os; print(os.path.dirname(kexue_fast.__file__))") || return 1
  diff -rq -x __pycache__ -x "_core*" -x kernels -x benchmarks "$installed" "$REPO/kexue_fast" &&
    diff -rq -x __pycache__ "$installed/kernels" "$REPO/kernels" &&
    diff -rq -x __pycache__ -x results "$installed/benchmarks" "$REPO/benchmarks"
}

stage_setup() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
  } 2>&1 | tee "$LOGS/env.txt"
  rm -rf "$SITE"  # a fresh target: pip --target keeps an existing package's old files
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$REPO"/.gpu/whl/*.whl 2>&1 | tail -3
  if ! $PY -c "import kexue_fast._core" 2>/dev/null; then
    if $PY -c "import scikit_build_core, pybind11" 2>/dev/null; then
      echo "carried wheel does not import here: building kexue_fast"
      rm -rf "$SITE"/kexue_fast*
      CMAKE_BUILD_PARALLEL_LEVEL=16 $PY -m pip install -q --no-index --no-deps --no-build-isolation \
        --target "$SITE" "$REPO" 2>&1 | tail -5
    else
      echo "carried wheel does not import here, and scikit-build-core/pybind11 are missing to build one"
    fi
  fi
  if ! $PY -c "import kexue_fast._core" > "$LOGS/import.txt" 2>&1; then
    echo "kexue_fast._core does not import:"; tail -n 20 "$LOGS/import.txt"; return 1
  fi
  if ! installed_matches_checkout > "$LOGS/wheel-diff.txt" 2>&1; then
    echo "the installed kexue_fast is not this checkout's (rebuild .gpu/whl at this commit):"
    head -n 20 "$LOGS/wheel-diff.txt"; return 1
  fi
  $PY -m kexue_fast.info 2>&1 | tee -a "$LOGS/env.txt"
}

stage_test() {
  local files=() log="${TEST_LOG:-tests.log}" rc
  for f in "$REPO"/tests/test_*.py; do
    grep -q cuda "$f" && files+=("$f")
  done
  [ -n "${TEST_FILES:-}" ] && files=($(for f in $TEST_FILES; do echo "$REPO/tests/$f"; done))
  # -v: each finished test is named in the log, so a run cut off by its timeout still says what passed.
  # One CPU thread per worker: 16 workers × 16 torch threads on 16 cores left 7 of 508 tests unfinished after 260 s
  # (H200, e2cb275; benchmarks/results/gpu-tests-cuda.md).
  OMP_NUM_THREADS=${TEST_THREADS:-1} timeout "$(budget "${TEST_TIMEOUT:-300}")" $PY -m pytest "${files[@]}" \
    -m "not slow" -n "${TEST_WORKERS:-8}" -v -rfEs --durations=25 -p no:cacheprovider \
    --junitxml="$LOGS/$log.xml" ${TEST_K:+-k "$TEST_K"} ${TEST_ARGS:-} > "$LOGS/$log" 2>&1
  rc=$?
  echo "tests: exit $rc"
  grep -v "PASSED\|SKIPPED\|^\[gw" "$LOGS/$log" | tail -n 60
  return $rc
}

stage_bench() {
  local failed=0 rc suite full
  for suite in ${BENCH_SUITES:-spectral flows ortho score rope hsic}; do
    full=""
    case "$suite" in hsic | ortho) full=--full ;; esac
    timeout "$(budget "${BENCH_TIMEOUT:-150}")" $PY -m kexue_fast.bench --device cuda --suite "$suite" $full \
      --out "$RESULTS" > "$LOGS/bench-$suite.log" 2>&1
    rc=$?
    echo "bench $suite: exit $rc"; tail -n 25 "$LOGS/bench-$suite.log"
    [ $rc -eq 0 ] || failed=1
  done
  return $failed
}

stage_jose() {
  local rc
  gunzip -c "$REPO/.gpu/corpus.txt.gz" > "$WORK/corpus.txt" || return 1
  timeout "$(budget "${JOSE_TIMEOUT:-200}")" $PY -m kexue_fast.benchmarks.jose_quality --device cuda \
    --corpus "$WORK/corpus.txt" --datasets "$REPO/.gpu" --out "$RESULTS" > "$LOGS/jose-quality.log" 2>&1
  rc=$?
  echo "jose quality: exit $rc"; tail -n 15 "$LOGS/jose-quality.log"
  return $rc
}

stage_sweep() {
  local rc
  timeout "$(budget "${SWEEP_TIMEOUT:-240}")" $PY -m kexue_fast.benchmarks.som_profile --sweep \
    ${SWEEP_SETTINGS:+--settings "$SWEEP_SETTINGS"} > "$LOGS/som-sweep.log" 2>&1
  rc=$?
  echo "som sweep: exit $rc"; tail -n 30 "$LOGS/som-sweep.log"
  return $rc
}

stage_profile() {
  local rc
  timeout "$(budget "${PROFILE_TIMEOUT:-120}")" $PY -m kexue_fast.benchmarks.som_profile --device cuda \
    > "$LOGS/som-profile.log" 2>&1
  rc=$?
  echo "som profile: exit $rc"
  if [ $rc -eq 0 ]; then grep "===" "$LOGS/som-profile.log"; else tail -n 20 "$LOGS/som-profile.log"; fi
  return $rc
}

stage_ncu() {
  local rc ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
  [ -n "$ncu" ] || { echo "ncu: not found"; return 1; }
  timeout "$(budget "${NCU_TIMEOUT:-180}")" "$ncu" --clock-control none --nvtx --nvtx-include "measure/" \
    --kernel-name regex:"_som_(gram|grad)_kernel" --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    $PY -m kexue_fast.benchmarks.som_profile --kernels-once ${NCU_SETTINGS:+--settings "$NCU_SETTINGS"} \
    > "$LOGS/som-ncu.log" 2>&1
  rc=$?
  echo "ncu: exit $rc"
  grep -E "^  _som|setting|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Warp Cycles Per Issued|ERR" "$LOGS/som-ncu.log" | head -n 80
  return $rc
}

stage_hostcost() {
  local rc
  timeout "$(budget "${HOSTCOST_TIMEOUT:-90}")" $PY -m kexue_fast.benchmarks.som_profile --host-costs \
    > "$LOGS/som-host.log" 2>&1
  rc=$?
  echo "som host costs: exit $rc"; tail -n 15 "$LOGS/som-host.log"
  return $rc
}

STAGES="setup test bench jose sweep profile hostcost ncu"
[ $# -gt 0 ] || { echo "name at least one stage ($STAGES)"; exit 2; }
for stage in "$@"; do  # a mistyped stage would otherwise surface only after the stages before it had run
  declare -F "stage_$stage" > /dev/null || { echo "unknown stage '$stage' ($STAGES)"; exit 2; }
done
[ -n "${KEXUE_GIT_SHA:-}" ] || echo "warning: KEXUE_GIT_SHA is not set: the results will say git: unknown"
status=0
: > "$OUT/summary.txt"
for stage in "$@"; do
  echo "=== $stage ($(date -u +%H:%M:%S))"
  "stage_$stage"
  rc=$?
  echo "$stage $rc $(( $(date +%s) - START ))s" >> "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then
    status=1
    if [ "$stage" = setup ]; then echo "=== setup failed: the other stages are skipped"; break; fi
  fi
done
echo "=== done ($(date -u +%H:%M:%S)); stage, exit status, seconds since the start:"
cat "$OUT/summary.txt"
exit $status
