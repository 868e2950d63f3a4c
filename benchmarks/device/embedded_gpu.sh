#!/bin/bash
# One device call for the embedded model (issue 7): GPU tests in the background, GPU training,
# then Compact capture + search on the new weights and the sparse-vs-dense quality sweep.
#   bash benchmarks/device/embedded_gpu.sh MINUTES   (writes under $OUT)
set -u
MIN=${1:-6}
export PYTHONPATH=$PWD:$PWD/kernels
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpu.txt
[ "${TESTS:-1}" = 1 ] && (timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/test_attention_ops.py tests/test_sparse_attention.py \
   tests/test_online_search.py tests/test_patterns_compact.py tests/test_block_index.py tests/test_layout.py \
   > $OUT/gpu_tests.txt 2>&1; echo "rc $?" >> $OUT/gpu_tests.txt) &
python3 -m dist_compact.models.train --minutes $MIN --out $OUT/embedded.safetensors --batch-size 32 --lr ${LR:-5e-4} \
  --ema 0.999 --warmup 100 --init dist_compact/models/weights/embedded.safetensors --log-every 200 --val-every 1000 \
  > $OUT/train.log 2>&1 || { tail -30 $OUT/train.log; exit 1; }
tail -5 $OUT/train.log
wait
[ -f $OUT/gpu_tests.txt ] && tail -3 $OUT/gpu_tests.txt
cp $OUT/embedded.safetensors $OUT/embedded.safetensors.sha256 $OUT/embedded.train.json dist_compact/models/weights/
W=dist_compact/models/weights
timeout 150 python3 -m dist_compact.search capture --out-dir $OUT/mass --capture-steps 4,8,12,16 \
  --prompt "a green circle moving right" --prompt "a purple square bouncing on dots" \
  --prompt "an orange triangle moving down on a gradient" --prompt "a white square moving up" \
  -- --config configs/cluster/1gpu.yaml --run.video false > $OUT/capture.log 2>&1 || tail -20 $OUT/capture.log
for TAU in 0.9 0.95; do
  timeout 60 python3 -m dist_compact.search search $OUT/mass/mass_*.pt --out $OUT/embedded-compact-$TAU.yaml \
    --tau $TAU --model embedded > $OUT/search-$TAU.log 2>&1; tail -4 $OUT/search-$TAU.log
done
timeout 240 python3 benchmarks/embedded_quality.py --csv $OUT/embedded_quality.csv \
  --variant "adaspa-0.25=" \
  --variant "adaspa-0.3=sparsity.sparsity=0.7" \
  --variant "adaspa-topp0.95-cap0.3=sparsity.sparsity=0.7,sparsity.top_p=0.95,sparsity.head_adaptive=false" \
  --variant "compact-0.9=sparsity.mode=compact,sparsity.compact_config=$OUT/embedded-compact-0.9.yaml" \
  --variant "compact-0.95=sparsity.mode=compact,sparsity.compact_config=$OUT/embedded-compact-0.95.yaml" \
  --variant "compact0.9+adaspa0.15=sparsity.mode=compact+adaspa,sparsity.compact_config=$OUT/embedded-compact-0.9.yaml,sparsity.sparsity=0.85" \
  > $OUT/quality.log 2>&1; grep -v "^{" $OUT/quality.log | tail -12
timeout 60 python3 generate.py --compare-dense --run.output-dir $OUT/runs --run.progress false --run.video false > $OUT/generate.log 2>&1; tail -3 $OUT/generate.log
