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
bash benchmarks/device/embedded_sweep.sh
