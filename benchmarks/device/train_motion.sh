#!/bin/bash
# One device call: train the embedded model (continuing the shipped weights, training
# times shifted toward the noise), re-search the demo's Compact config on the new weights, then the
# motion benchmark (dense vs the demo's sparse config, prompt grid), sparse-vs-dense PSNR on the demo
# path, and frames.png of the default prompt.
#   bash benchmarks/device/train_motion.sh [TRAIN_MINUTES]      (writes under $OUT; ~3.5 min + TRAIN_MINUTES)
# Comes back (<= 8 files): w/embedded.safetensors, w/ckpt.part-aa/ab (the bf16 resume checkpoint, split
# under the 16 MiB file limit: cat them to embedded.ckpt.pt), frames.png, bundle.tar.gz (logs, CSVs,
# the searched Compact configs, train.json). The .sha256 is recomputed from the weights on return.
# Resume from an earlier call: INIT= RESUME=path/embedded.ckpt.pt (the weights file beside it).
set -u
MIN=${1:-5}
export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1
B=/tmp/bundle; mkdir -p $B $OUT/w
# the bundle is re-packed at every stage, so a call cut short still brings back what it finished
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $B/steps.log; tar czf $OUT/bundle.tar.gz -C /tmp bundle; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $B/gpu.txt
W=dist_compact/models/weights
if [ -n "${RESUME:-}" ]; then START=(--resume "$RESUME"); else START=(--init ${INIT:-$W/embedded.safetensors}); fi
stamp train
python3 -m dist_compact.models.train --minutes $MIN --out $OUT/w/embedded.safetensors "${START[@]}" \
  --batch-size ${BATCH:-32} --lr ${LR:-4e-4} --warmup 100 --ema 0.999 --time-shift ${SHIFT:-3} \
  --log-every 200 --val-every 1000 --save-every 2 --ckpt-dtype bf16 --no-preview 2>&1 | tee $B/train.log | grep -E "step [0-9]*000 |done|final|Error|error" 
[ -f $OUT/w/embedded.safetensors ] || { tail -30 $B/train.log; exit 1; }
sha256sum $OUT/w/embedded.safetensors | tee -a $B/steps.log
cp $OUT/w/embedded.safetensors $OUT/w/embedded.safetensors.sha256 $W/
mv $OUT/w/embedded.train.json $B/
split -b 15M $OUT/w/embedded.ckpt.pt $OUT/w/ckpt.part- && rm $OUT/w/embedded.ckpt.pt $OUT/w/embedded.safetensors.sha256

stamp capture  # the demo's Compact config, re-searched on the new weights (same prompts / steps as before)
P=(--prompt "a green circle moving right" --prompt "a purple square bouncing on a checkerboard"
   --prompt "an orange triangle moving down on a gradient" --prompt "a white square moving up")
timeout 100 python3 -m dist_compact.cli.search capture --out-dir /tmp/mass --capture-steps 4,8,12,16 "${P[@]}" \
  -- --config configs/cluster/1gpu.yaml --run.video false --model.tile 1,4,4 > $B/capture.log 2>&1 || tail -5 $B/capture.log
for TAU in 0.5 0.6 0.7; do
  timeout 30 python3 -m dist_compact.cli.search search /tmp/mass/mass_*.pt --out $B/embedded-compact-$TAU.yaml \
    --tau $TAU --model embedded 2>&1 | tail -1
done
[ -f $B/embedded-compact-0.5.yaml ] && cp $B/embedded-compact-0.5.yaml $W/embedded-compact-0.5.yaml

stamp demo  # the default demo (generate.py defaults) with the dense comparison: frames.png, PSNR
timeout 60 python3 generate.py --run.video false --output-dir /tmp/runs --name demo --compare-dense 2>&1 | tail -2 | tee -a $B/steps.log
cp /tmp/runs/demo/frames.png $OUT/frames.png 2>/dev/null; cp /tmp/runs/demo/report.json $B/demo_report.json 2>/dev/null

stamp motion  # the motion benchmark: whole grid (480 prompts) x 2 seeds, dense and the demo's sparse config
timeout ${MOTION_S:-150} python3 benchmarks/motion_quality.py --seeds 2 --batch 60 --csv $B/motion.csv > $B/motion.log 2>&1
tail -4 $B/motion.log

stamp quality  # sparse vs dense on the demo path (one clip per run, cond/uncond sharing one index)
C6="sparsity.compact_config=$B/embedded-compact-0.6.yaml"
timeout ${QUALITY_S:-90} python3 benchmarks/embedded_quality.py --csv $B/embedded_quality.csv \
  --prompt "a red square moving left" --prompt "a blue circle bouncing on stripes" --prompt "a yellow triangle moving up" \
  --prompt "a green circle moving right on a gradient" \
  --variant "demo=" --variant "demo-adaspa0.05=sparsity.sparsity=0.95" --variant "compact0.6+adaspa0.05=$C6;sparsity.sparsity=0.95" \
  > $B/quality.log 2>&1; grep -v "^{" $B/quality.log | tail -5
stamp end
ls -la $OUT $OUT/w
