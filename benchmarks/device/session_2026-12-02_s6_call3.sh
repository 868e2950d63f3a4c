#!/usr/bin/env bash
# Sixth session, device call 3 (2026-12-02, H200). Issue 19 on the final defaults (weights 07d592bb...,
# sampler shift 3, demo sparsity = configs/sparsity/demo.yaml): the motion benchmark on the whole grid
# (dense, the demo, and the demo with AdaSpa's paper head rule), the demo path's PSNR (4 prompts) and
# generate.py's default frames.png; issue 16/17: share_gpu_check.sh (every layout x three models, on the
# tree with the Ulysses head-order device cache) beside it on the same GPU (equality only, no timing).
set -u
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1
B=/tmp/bundle3; mkdir -p $B
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $B/steps.log; tar czf $OUT/bundle.tar.gz -C /tmp bundle3; }
stamp start
( OUT=/tmp/sg timeout 330 bash benchmarks/device/share_gpu_check.sh > $B/share_gpu.log 2>&1; echo "share_gpu rc=$?" >> $B/share_gpu.log
  cp /tmp/sg/share_gpu/share_gpu_check.csv $B/ 2>/dev/null; stamp share-gpu-done ) &
( timeout 330 python3 benchmarks/motion_quality.py --seeds 2 --batch 80 --variant "demo=" \
    --variant "demo-paper-heads=sparsity.head_adaptive=true" --csv $B/motion.csv > $B/motion.log 2>&1; stamp motion-done ) &
timeout 150 python3 benchmarks/embedded_quality.py --csv $B/quality.csv \
  --prompt "a red square moving left" --prompt "a blue circle bouncing on stripes" --prompt "a yellow triangle moving up" \
  --prompt "a green circle moving right on a gradient" --variant "demo=" --variant "demo-paper-heads=sparsity.head_adaptive=true" \
  > $B/quality.log 2>&1; stamp quality-done
timeout 60 python3 generate.py --run.video false --output-dir /tmp/runs --name demo --compare-dense > $B/demo.log 2>&1
cp /tmp/runs/demo/frames.png $OUT/frames.png 2>/dev/null; cp /tmp/runs/demo/report.json $B/demo_report.json 2>/dev/null
stamp demo-done
wait
for f in quality motion share_gpu demo; do echo "== $f"; grep -v "^{" $B/$f.log | tail -14; done
stamp end
