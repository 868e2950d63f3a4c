#!/usr/bin/env bash
# Session of 2026-12-03, device call 1 (H200), issue 16 on this tree (key-range ring traffic, online
# Ulysses head re-plan): the scaling model alone on the GPU (timings), then the ranks-sharing-one-GPU
# check (equality, every layout x three models, floor-relative limit).
set -u
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1
B=$OUT/c1; mkdir -p $B
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $B/steps.log; }
stamp start
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $B/steps.log
timeout 200 python3 benchmarks/scaling_model.py --out $B/sm > $B/scaling_model.log 2>&1; stamp "scaling_model rc=$?"
OUT=/tmp/sg timeout 360 bash benchmarks/device/share_gpu_check.sh > $B/share_gpu.log 2>&1; stamp "share_gpu rc=$?"
cp /tmp/sg/share_gpu/share_gpu_check.csv $B/ 2>/dev/null; cp /tmp/sg/share_gpu/floor-*.json $B/ 2>/dev/null
for f in scaling_model share_gpu; do echo "== $f"; grep -v "^{" $B/$f.log | tail -40; done
stamp end
