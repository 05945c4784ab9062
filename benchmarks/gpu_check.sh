#!/usr/bin/env bash
# The GPU checks in one prepared script, for a lent CUDA machine (bare image: torch, triton, pytest, no network).
#
#   bash benchmarks/gpu_check.sh STAGE...      stages, in the order given:
#     setup   install the carried wheels (.gpu/whl: a kexue_fast cp3XX wheel built elsewhere, normflows, FrEIA);
#             build kexue_fast here instead when the carried wheel is missing or will not import
#     test    every test file that runs CUDA paths when a GPU is present (`gpu` tests included, slow ones not), or
#             the files named in TEST_FILES (names under tests/, space-separated); TEST_WORKERS (8), TEST_THREADS
#             (1 per worker), TEST_TIMEOUT (300 s), TEST_K (a pytest -k expression), TEST_ARGS (more pytest
#             arguments, split on spaces); TEST_LOG names the log (tests.log), so that several runs keep theirs
#     bench   python -m kexue_fast.bench --device cuda for the GPU suites (hsic with --full: its n = 10⁶ goal; ortho
#             with --full: 5 rounds of the step, whose overhead spread over up to 60 points between the rounds of
#             one run on an H200, benchmarks/results/som-sweep-cuda.md)
#     jose    the JoSE GPU trainer's word similarity and training speed (benchmarks/jose_quality.py --device cuda)
#             on the carried corpus (.gpu/corpus.txt.gz) and datasets (.gpu/wordsim353.tsv, .gpu/simlex999.txt)
#     sweep   the fused SOM kernels under each launch setting, their error, and the CNN step with the fastest
#             accurate ones (benchmarks/som_profile.py --sweep), into logs/som-sweep.log
#     profile where the fused SOM path spends a CNN step (benchmarks/som_profile.py: device and host time per
#             operator, Python hot spots), into logs/som-profile.log
#
# Preparing .gpu/ here (git-excluded: `echo /.gpu/ >> .git/info/exclude`), for the machine's CPython (3.12 there):
#   python3.12 -m pip wheel --no-deps -w .gpu/whl .            # kexue_fast, C++ core included
#   pip download --no-deps -d /tmp/sd normflows FrEIA && pip wheel --no-deps -w .gpu/whl /tmp/sd/*
#   gzip -c "$(python -c 'from kexue_fast.datasets import offline_corpus as c; print(c())')" > .gpu/corpus.txt.gz
#   cp <gensim>/test/test_data/{wordsim353.tsv,simlex999.txt} .gpu/
# and name .gpu in the device call's carry.
#
# Everything runs outside the checkout (so the installed package, not the source tree, is imported) and lands in
# $OUT as two archives, results.tgz (benchmarks/results files) and logs.tgz, rewritten after every stage. Set
# KEXUE_GIT_SHA to the checkout's sha: the tree travels without .git.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/kexue_gpu_out}
PY=${PY:-python3}
WORK=/tmp/kexue_gpu
mkdir -p "$OUT" "$WORK/logs" "$WORK/results"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/kexue_site${PYTHONPATH:+:$PYTHONPATH}
cd "$WORK" || exit 1

pack() {  # through a temporary name: a run killed mid-tar keeps the previous stage's archives whole
  tar czf "$OUT/.results.tgz" -C "$WORK/results" . && mv "$OUT/.results.tgz" "$OUT/results.tgz"
  tar czf "$OUT/.logs.tgz" -C "$WORK/logs" . && mv "$OUT/.logs.tgz" "$OUT/logs.tgz"
}

stage_setup() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
  } 2>&1 | tee "$WORK/logs/env.txt"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/kexue_site "$REPO"/.gpu/whl/*.whl 2>&1 | tail -3
  if ! $PY -c "import kexue_fast._core" 2>/dev/null; then
    echo "carried wheel does not import here: building kexue_fast"
    rm -rf /tmp/kexue_site/kexue_fast*
    CMAKE_BUILD_PARALLEL_LEVEL=16 $PY -m pip install -q --no-index --no-deps --no-build-isolation \
      --target /tmp/kexue_site "$REPO" 2>&1 | tail -5
  fi
  $PY -m kexue_fast.info 2>&1 | tee -a "$WORK/logs/env.txt"
}

stage_test() {
  local files=()
  for f in "$REPO"/tests/test_*.py; do
    grep -q cuda "$f" && files+=("$f")
  done
  [ -n "${TEST_FILES:-}" ] && files=($(for f in $TEST_FILES; do echo "$REPO/tests/$f"; done))
  # -v: each finished test is named in tests.log, so a run cut off by TEST_TIMEOUT still says what passed.
  # One CPU thread per worker: 16 workers × 16 torch threads on 16 cores left 7 of 508 tests unfinished after 260 s
  # (H200, e2cb275; benchmarks/results/gpu-tests-cuda.md).
  OMP_NUM_THREADS=${TEST_THREADS:-1} timeout "${TEST_TIMEOUT:-300}" $PY -m pytest "${files[@]}" -m "not slow" \
    -n "${TEST_WORKERS:-8}" -v -rfEs --durations=25 -p no:cacheprovider --junitxml="$WORK/logs/${TEST_LOG:-tests.log}.xml" \
    ${TEST_K:+-k "$TEST_K"} ${TEST_ARGS:-} > "$WORK/logs/${TEST_LOG:-tests.log}" 2>&1
  echo "tests: exit $?"
  grep -v "PASSED\|SKIPPED\|^\[gw" "$WORK/logs/${TEST_LOG:-tests.log}" | tail -n 60
}

stage_bench() {
  for suite in ${BENCH_SUITES:-spectral flows ortho score rope hsic}; do
    local full=""
    case "$suite" in hsic | ortho) full=--full ;; esac
    timeout "${BENCH_TIMEOUT:-150}" $PY -m kexue_fast.bench --device cuda --suite "$suite" $full \
      --out "$WORK/results" > "$WORK/logs/bench-$suite.log" 2>&1
    echo "bench $suite: exit $?"; tail -n 25 "$WORK/logs/bench-$suite.log"
    pack
  done
}

stage_jose() {
  gunzip -c "$REPO/.gpu/corpus.txt.gz" > "$WORK/corpus.txt"
  timeout "${JOSE_TIMEOUT:-200}" $PY -m kexue_fast.benchmarks.jose_quality --device cuda --corpus "$WORK/corpus.txt" \
    --datasets "$REPO/.gpu" --out "$WORK/results" > "$WORK/logs/jose-quality.log" 2>&1
  echo "jose quality: exit $?"; tail -n 15 "$WORK/logs/jose-quality.log"
}

stage_sweep() {
  timeout "${SWEEP_TIMEOUT:-240}" $PY -m kexue_fast.benchmarks.som_profile --sweep > "$WORK/logs/som-sweep.log" 2>&1
  echo "som sweep: exit $?"; tail -n 30 "$WORK/logs/som-sweep.log"
}

stage_profile() {
  timeout "${PROFILE_TIMEOUT:-120}" $PY -m kexue_fast.benchmarks.som_profile --device cuda \
    > "$WORK/logs/som-profile.log" 2>&1
  echo "som profile: exit $?"; grep "===" "$WORK/logs/som-profile.log"
}

for stage in "$@"; do
  echo "=== $stage ($(date -u +%H:%M:%S))"
  "stage_$stage"
  pack
done
echo "=== done ($(date -u +%H:%M:%S))"
