#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU check on the full shapes, then tests on that machine's own JAX.
#
#   launch/gpu_session.sh                                    # from any directory; the checkout is this file's ../
#   NLPRESS_GIT_COMMIT=<sha> OUT=/some/dir launch/gpu_session.sh
#
# Installs nothing (the machine has no network): the checkout goes on PYTHONPATH and runs on the python that has
# the machine's JAX (PYTHON, default python3). Everything lands under OUT (default ./gpu_out), at most 6 files:
#   summary.txt       what ran, exit codes, seconds
#   environment.txt   nvidia-smi and jax.print_environment_info()
#   gpu_check.json    experiments.benchmarks.gpu_check (device, JAX/jaxlib/CUDA versions, date, commit, rows)
#   gpu_check.log     its progress lines and table
#   tests.log         pytest -v, one line per test as it finishes (useful even when the time limit cuts it)
#   tests.xml         JUnit XML (only when the suite finishes in time)
#
# Time: a device call may run 600 s, so the script ends within TOTAL_S (default 540 s). The check gets CHECK_BUDGET_S
# (default 300 s: gpu_check skips rows, marked skipped-for-budget, rather than overrun it; a hard `timeout` 60 s
# later catches a compilation that hangs). The tests get what is left under `timeout`.
#
# Which tests: the whole suite takes about 7 minutes on 2 CPU cores with xdist and longer on a GPU (every tiny test
# compiles its own GPU programs), so it cannot share 540 s with the check. SUITE (default below) is a quick subset,
# ordered by what a new JAX or a GPU most likely breaks: the GPU check's own test, precision policies and float16
# loss scaling, the train step, the Transformer, int8 (real int8 equal to fake quantization to the bit), compaction,
# module replacement, fusion, the BiLSTM. The whole suite on the same JAX: `make test-gpu PYTHON=python3` (no time
# limit). Tests run with plain pytest and tests/skip_missing_modules.py, so tests that need a package the image
# lacks (ml_collections, datasets, tensorboardX, gcsfs, jax2onnx, TensorRT) are reported as skipped, naming it.
#
# Variables: PYTHON, OUT, TOTAL_S, CHECK_BUDGET_S, GPU_CHECK_ARGS (more gpu_check flags, after the defaults: the last
# value of a flag wins), SUITE, NLPRESS_GIT_COMMIT (the commit the JSON records when the copy has no .git).

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

PYTHON=${PYTHON:-python3}
OUT=${OUT:-./gpu_out}
TOTAL_S=${TOTAL_S:-540}
CHECK_BUDGET_S=${CHECK_BUDGET_S:-300}
GPU_CHECK_ARGS=${GPU_CHECK_ARGS:-}
SUITE=${SUITE:-"tests/experiments/benchmarks/test_gpu_check.py tests/compression/test_precision.py
tests/compression/test_loss_scale.py tests/experiments/runtime/test_trainer.py tests/models/test_transformer.py
tests/compression/quantization/test_transformer_quant.py tests/compression/quantization/test_fake_quant.py
tests/compression/pruning/test_pruning.py tests/compression/test_theseus.py tests/compression/test_fusion.py
tests/models/test_bilstm.py"}

mkdir -p "$OUT" || exit 1
: > "$OUT/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS
log() { echo "[gpu_session $((SECONDS - start)) s] $*" | tee -a "$OUT/summary.txt"; }

log "checkout $PWD, python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>&1), OUT=$OUT"
if [ ! -d .git ] && [ -z "${NLPRESS_GIT_COMMIT:-}" ]; then
    log "no .git here and NLPRESS_GIT_COMMIT unset: the JSON records the commit as unknown"
fi
{
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo
    timeout -k 5 60 "$PYTHON" -c 'import jax; jax.print_environment_info()' 2>&1
} > "$OUT/environment.txt"

check_limit=$((CHECK_BUDGET_S + 60))
log "gpu_check: budget ${CHECK_BUDGET_S} s, hard limit ${check_limit} s, extra flags: ${GPU_CHECK_ARGS:-none}"
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of flags
timeout -k 10 "$check_limit" "$PYTHON" -m experiments.benchmarks.gpu_check --budget_s="$CHECK_BUDGET_S" \
    --out="$OUT/gpu_check.json" $GPU_CHECK_ARGS 2>&1 | tee "$OUT/gpu_check.log"
check_rc=${PIPESTATUS[0]}
log "gpu_check: exit $check_rc"

suite_s=$((TOTAL_S - (SECONDS - start) - 5))
if [ "$suite_s" -lt 20 ]; then
    suite_rc=skipped
    log "tests: skipped, ${suite_s} s left"
else
    log "tests: ${suite_s} s for $(echo $SUITE | wc -w) paths"
    # shellcheck disable=SC2086  # SUITE is a list of paths
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "$suite_s" "$PYTHON" -m pytest -v -rs -p no:cacheprovider \
        -p tests.skip_missing_modules --junitxml="$OUT/tests.xml" $SUITE 2>&1 | tee "$OUT/tests.log"
    suite_rc=${PIPESTATUS[0]}
    if [ "$suite_rc" -eq 124 ]; then
        log "tests: stopped at the ${suite_s} s limit; tests.log lists the tests that finished"
    fi
fi
log "done: gpu_check exit $check_rc, tests exit $suite_rc, $((SECONDS - start)) s in all"
[ "$check_rc" -eq 0 ] && [ "$suite_rc" = 0 ]
