#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run, each step with its own time limit:
#
#   1. pytest -m gpu                         the fused kernels against the reference (builds them)
#   2. benchmarks/ops_bench.py               fused ops and a G + D training step, CUDA vs reference
#   3. benchmarks/attfind_bench.py gpu64     AttFind seconds per image for all coordinates at 64x64
#   4. benchmarks/train_bench.py gpu64       training throughput, ops_impl=cuda against ref
#
#   bash benchmarks/gpu_checks.sh [out_dir]        (default: gpu_checks/)
#
# Logs and JSON go to out_dir; a failing step does not stop the next, and the exit status is the
# number of steps that failed (0, with a message, where no GPU is visible). STEP_TIMEOUT
# (seconds, default 240) bounds each step, and PYTHON picks the interpreter (default: python3).
set -u
cd "$(dirname "$0")/.."
out="${1:-gpu_checks}"
mkdir -p "$out"
py="${PYTHON:-python3}"
limit="${STEP_TIMEOUT:-240}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
failed=0

step() {  # step <name> <command...>: run it under the time limit, log to out_dir/<name>.log
    local name="$1"; shift
    local start=$SECONDS
    echo "=== $name: $*"
    timeout --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} | tee "$out/device.txt"
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "No CUDA GPU is visible: every check here needs one, so there is nothing to run."
    exit 0
fi

step pytest_gpu "$py" -m pytest -m gpu -q -x -p no:cacheprovider tests/test_ops_cuda.py
step ops_bench "$py" benchmarks/ops_bench.py
step attfind_bench "$py" benchmarks/attfind_bench.py --model gpu64 --device cuda --exhaustive-images 4 \
    --num-images 64 --out "$out/attfind_bench.json"
step train_bench_cuda "$py" benchmarks/train_bench.py --model gpu64 --precision bf16-mixed --steps 30 \
    --override ops_impl=cuda
step train_bench_ref "$py" benchmarks/train_bench.py --model gpu64 --precision bf16-mixed --steps 30 \
    --override ops_impl=ref

echo "steps failed: $failed"
exit "$failed"
