#!/usr/bin/env bash
# Sixth session, device call 2 (2026-12-02, H200), issue 19 on the retrained weights (07d592bb...):
# sparse demo candidates (benchmarks/device/s6_variants.txt) under the sampler the sweep of call 1 chose
# (shift 5, guidance 4): motion + PSNR vs dense on every 6th clip of the grid, the demo path's PSNR
# (embedded_quality, 4 prompts), a shift-3 cross-check, and the Compact configs re-searched on the new
# weights. All stages share the GPU at once (no timing is used). Returns bundle.tar.gz.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1
B=/tmp/bundle2; mkdir -p $B
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $B/steps.log; tar czf $OUT/bundle.tar.gz -C /tmp bundle2; }
sha256sum dist_compact/models/weights/embedded.safetensors | tee $B/weights.txt
V=(); Q=(); while read -r l; do [ -n "$l" ] && V+=(--variant "$l") && Q+=(--variant "$l;run.shift=5"); done < benchmarks/device/s6_variants.txt
stamp start
( timeout 300 python3 benchmarks/motion_quality.py --seeds 2 --every 6 --batch 80 --set run.shift=5 --set run.guidance=4 \
    "${V[@]}" --csv $B/motion_s5.csv > $B/motion_s5.log 2>&1; stamp motion-s5-done ) &
( timeout 300 python3 benchmarks/motion_quality.py --seeds 2 --every 6 --batch 80 --set run.shift=3 --set run.guidance=4 \
    "${V[@]:2:2}" "${V[@]:10:2}" "${V[@]:18:2}" --csv $B/motion_s3.csv > $B/motion_s3.log 2>&1; stamp motion-s3-done ) &
( timeout 300 python3 benchmarks/embedded_quality.py --csv $B/quality_s5.csv --steps 20 \
    --prompt "a red square moving left" --prompt "a blue circle bouncing on stripes" --prompt "a yellow triangle moving up" \
    --prompt "a green circle moving right on a gradient" --config configs/cluster/1gpu.yaml \
    "${Q[@]}" > $B/quality_s5.log 2>&1; stamp quality-done ) &
W=dist_compact/models/weights
P=(--prompt "a green circle moving right" --prompt "a purple square bouncing on a checkerboard"
   --prompt "an orange triangle moving down on a gradient" --prompt "a white square moving up")
timeout 150 python3 -m dist_compact.search capture --out-dir /tmp/mass --capture-steps 4,8,12,16 "${P[@]}" \
  -- --config configs/cluster/1gpu.yaml --run.video false --run.shift 5 --model.tile 1,4,4 > $B/capture.log 2>&1 || tail -5 $B/capture.log
for TAU in 0.5 0.6 0.7; do
  timeout 60 python3 -m dist_compact.search search /tmp/mass/mass_*.pt --out $B/embedded-compact-$TAU.yaml \
    --tau $TAU --model embedded 2>&1 | tail -1
done
stamp search-done
wait
for f in motion_s5 motion_s3 quality_s5; do echo "== $f"; grep -v "^{" $B/$f.log | tail -16; done
stamp end
