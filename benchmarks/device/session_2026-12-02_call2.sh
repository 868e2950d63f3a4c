#!/usr/bin/env bash
# Second device call (2026-12-02, H200): the GPU test files after the kernel-layer move (issue 17), the
# diffusers-backend check (issue 18), and where the embedded model's ring difference of call 1 comes
# from (share_gpu_check --variant compact / fp32, issue 16). Each stage has its own time limit.
set -u
cd "$(dirname "$0")/../.."
REAL_OUT=${OUT:?}
S=/tmp/scratch; mkdir -p $S
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels || exit 1
export PYTHONUNBUFFERED=1
{
echo "== GPU tests"; timeout 230 python3 -m pytest -q -p no:cacheprovider -x tests/test_block_sparse_ws.py tests/test_attention_ops.py tests/test_sparse_attention.py 2>&1 | tail -15; echo "rc=$?"
echo "== diffusers_backend_check"; timeout 130 python3 benchmarks/device/diffusers_backend_check.py --out $S/diff; echo "rc=$?"
for v in compact fp32; do
  echo "== share_gpu_check embedded --variant $v"
  D=$S/sg-$v
  timeout 45 python3 benchmarks/device/share_gpu_check.py --reference --models embedded --variant $v --out $D
  timeout 60 python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/device/share_gpu_check.py \
      --models embedded --variant $v --out $D 2>&1 | grep -v "^W[0-9]* \|OMP_NUM_THREADS\|^\*\*\*\*" | tail -8
  python3 benchmarks/device/share_gpu_check.py --summary --out $D; cp $D/share_gpu_check.csv $REAL_OUT/share_gpu_$v.csv
done
} 2>&1 | tee $REAL_OUT/call2.log
cp $S/diff/diffusers_backend_check.json $REAL_OUT/ 2>/dev/null
ls $REAL_OUT
