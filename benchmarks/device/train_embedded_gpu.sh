#!/bin/bash
# Train the GPU-scale embedded model (16 frames x 128 x 128 px, 16,384 video tokens, 4 heads of 128)
# in one device call, in stages that each start from the last one's EMA weights:
#   bash benchmarks/device/train_embedded_gpu.sh STAGE:MINUTES[:BATCH[:LR]] ...
# STAGE is the clip size, e.g. 64 (16 x 64 x 64) or 128 (16 x 128 x 128). The first stage starts from
# INIT (a weights file) if set, else from a new model. Writes under $OUT (<= 16 MiB a file, so the
# bf16 weights come back split): w.part-aa.. (cat them to embedded-gpu.safetensors), train.tar.gz (the
# training logs and .train.json of every stage); the last stage's weights also stay on the machine in
# outputs/embedded-gpu/ (ignored by git), where embedded_gpu_eval.sh takes them on a warm machine.
set -u
export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W/logs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $W/logs/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $W/logs/gpu.txt
PREV=${INIT:-}
i=0
for spec in "$@"; do
  IFS=: read -r SIZE MIN BATCH LR <<< "$spec"
  i=$((i + 1))
  OUTW=$W/stage$i.safetensors
  if [ -n "$PREV" ]; then START=(--init "$PREV" --frames 16 --height $SIZE --width $SIZE --warmup 50)
  else START=(--dim 512 --depth 6 --heads 4 --mlp-ratio 3 --frames 16 --height $SIZE --width $SIZE --warmup 200); fi
  python3 -m dist_compact.models.train --minutes $MIN --out $OUTW "${START[@]}" --batch-size ${BATCH:-8} \
    --lr ${LR:-3e-4} --ema 0.999 --time-shift 3 --log-every 100 --val-every 500 --save-every 100 \
    --save-dtype bf16 --no-checkpoint --no-preview --compile 2>&1 | tee $W/logs/stage$i.log \
    | grep -E "model |step [0-9]*00 loss|val loss|done|final|Error|error|Traceback"
  [ -f $OUTW ] || { tail -30 $W/logs/stage$i.log; break; }
  cp $W/stage$i.train.json $W/logs/
  PREV=$OUTW
done
tar czf $OUT/train.tar.gz -C $W logs
if [ -n "$PREV" ] && [ "$PREV" != "${INIT:-}" ]; then
  sha256sum $PREV | tee $W/logs/sha256.txt
  split -b 15M $PREV $OUT/w.part-
  # kept on the machine too (outputs/ is ignored, so a next call on the warm machine finds it there)
  mkdir -p outputs/embedded-gpu && cp $PREV outputs/embedded-gpu/embedded-gpu.safetensors
  cp $PREV.sha256 outputs/embedded-gpu/embedded-gpu.safetensors.sha256
  sed -i "s/ $(basename $PREV)\$/ embedded-gpu.safetensors/" outputs/embedded-gpu/embedded-gpu.safetensors.sha256
fi
ls -la $OUT
