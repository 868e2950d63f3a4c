#!/usr/bin/env bash
# Sixth session, device call 4: share_gpu_check at P = 4 alone, with every rank's output (call 3's P = 4
# launch exited 1 on ranks 1 and 3 while the motion benchmark shared the GPU).
set -u
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1
D=$OUT/sg; mkdir -p $D
timeout 60 python3 benchmarks/device/share_gpu_check.py --reference --models embedded,hunyuan,wan --out $D > $OUT/ref.log 2>&1
timeout 200 python3 -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/device/share_gpu_check.py \
  --models embedded,hunyuan,wan --out $D > $OUT/p4.log 2>&1; echo "rc=$?"
python3 benchmarks/device/share_gpu_check.py --summary --out $D
grep -n "Error\|error\|Traceback" $OUT/p4.log | grep -v "^.*W[0-9]* " | head -20
grep -B2 -A12 "Traceback" $OUT/p4.log | head -60
