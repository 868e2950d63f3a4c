#!/usr/bin/env bash
# Session of 2026-12-03, device call 2 (H200), issue 16: the ranks-sharing-one-GPU check with AdaSpa's
# per-head budgets (paper rule) for the random HunyuanVideo / Wan transformers, so the Ulysses layouts
# re-plan their heads online and move the index and LSE on the GPU; then the GPU test files.
set -u
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1
B=$OUT/c2; mkdir -p $B
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $B/steps.log; }
stamp start
OUT=/tmp/sgp VARIANT=paper-heads ONLY_MODELS=hunyuan,wan timeout 200 bash benchmarks/device/share_gpu_check.sh > $B/share_gpu_paper.log 2>&1
stamp "share_gpu paper-heads rc=$?"
cp /tmp/sgp/share_gpu/share_gpu_check.csv $B/share_gpu_check_paper.csv 2>/dev/null
timeout 220 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_sparse_attention.py tests/test_attention_ops.py \
  tests/test_block_sparse_ws.py > $B/gpu_tests.log 2>&1
stamp "gpu tests rc=$?"
for f in share_gpu_paper gpu_tests; do echo "== $f"; grep -v "^{" $B/$f.log | tail -25; done
stamp end
