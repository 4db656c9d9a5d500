#!/usr/bin/env bash
# The scale-out checks that need a GPU (the multi-process curve, mixed precision with several processes on CUDA)
# in one command, for a lent GPU machine whose time is short.
#
#   bash benchmarks/gpu_run.sh wheels   # here, with pip access: the packages the GPU image lacks, into .whl/
#   bash benchmarks/gpu_run.sh          # there (the device tool: carry .whl, timeout_s 590); results under $OUT
#
# What runs, each step under its own time limit so that one slow step cannot eat the others' time:
#   1. the CUDA-only test (16-mixed's gradient scaler against lightning.Trainer) and the GPU's facts;
#   2. the scaling curve: benchmarks/parallel.py, 1, 2, 4 and 8 processes sharing the one GPU, the FedAvg recipe and
#      the transformer workload, clients per second against the one-process GPU run;
#   3. mixed precision with several processes: the FedAvg recipe with 1 and 2 processes on the GPU, bf16-mixed and
#      16-mixed (with its gradient scaler).
# Every step's output goes to $OUT/gpu_run.log and the tables to $OUT/*.json; the script exits non-zero when a step
# failed, after running the others.
#
# On a machine without CUDA (to try the script itself): ACCELERATOR=cpu PROCESSES=2 ROUNDS=1 OUT=/tmp/gpu bash
# benchmarks/gpu_run.sh
set -u -o pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "wheels" ]; then
    # The GPU image has torch, lightning, numpy, numba, scipy, matplotlib, rich, safetensors, yaml
    # (/work/.library/device/KINDS.md); these are what lightning_fed imports beyond them (no dependencies pulled).
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl \
        jsonargparse docstring-parser typeshed-client mnist1d cryptography cffi pycparser torch-pruning || exit 1
    ls -la .whl
    exit 0
fi

OUT="${OUT:?set OUT to the folder for the results}"
ACCELERATOR="${ACCELERATOR:-cuda}"
PROCESSES="${PROCESSES:-2 4 8}"
ROUNDS="${ROUNDS:-5}"
PY="${PY:-python3}"
LOG="$OUT/gpu_run.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
failed=()

if ! "$PY" -c "import jsonargparse, mnist1d, cryptography, torch_pruning" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1
then  # the packages are missing here and were brought as wheels
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
# the server's compiled loops need a numba that matches the image's numpy; without one the loop uses torch's ops
"$PY" -c "import numba" 2>/dev/null || export LIGHTNING_FED_NO_NUMBA=1

step() {  # step NAME SECONDS COMMAND...: run it, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

step facts 40 "$PY" -c "
import torch, lightning, numpy, sys, os
print('python', sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__,
      'numpy', numpy.__version__, 'cores', os.cpu_count(), 'numba', os.environ.get('LIGHTNING_FED_NO_NUMBA') is None)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')
import lightning_fed; print('lightning_fed imports')"
if [ "$ACCELERATOR" = cuda ]; then
    step cuda-test 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_parity.py -k "16_mixed"
fi
for workload in fedavg transformer; do
    # shellcheck disable=SC2086  # PROCESSES is a list of numbers
    step "curve-$workload" 150 "$PY" benchmarks/parallel.py --accelerator "$ACCELERATOR" --workloads "$workload" \
        --processes $PROCESSES --rounds "$ROUNDS" --json "$OUT/curve-$workload.json"
done
for precision in bf16-mixed 16-mixed; do
    step "$precision" 75 "$PY" benchmarks/parallel.py --accelerator "$ACCELERATOR" --workloads fedavg \
        --processes 2 --rounds "$ROUNDS" --precision "$precision" --json "$OUT/$precision.json"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" | tee -a "$LOG"
    exit 1
fi
echo "every step passed" | tee -a "$LOG"
