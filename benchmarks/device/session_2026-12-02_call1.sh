#!/usr/bin/env bash
# One device call (2026-12-02, H200): issue 16's share-GPU equality table and scaling model, issue 18's
# diffusers-backend check. Every stage has its own time limit so one stage cannot starve the others;
# stage outputs go to a scratch folder and the few files that matter are copied to $OUT (8 at most).
set -u
cd "$(dirname "$0")/../.."
REAL_OUT=${OUT:?}
S=/tmp/scratch; mkdir -p $S
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels || exit 1
export PYTHONUNBUFFERED=1
{
echo "== share_gpu_check"; OUT=$S timeout 250 bash benchmarks/device/share_gpu_check.sh; echo "rc=$?"
echo "== diffusers_backend_check"; timeout 130 python3 benchmarks/device/diffusers_backend_check.py --out $S/diff; echo "rc=$?"
echo "== scaling_model"; timeout 190 python3 benchmarks/scaling_model.py --out $S/scal; echo "rc=$?"
} 2>&1 | tee $REAL_OUT/call1.log
cp $S/share_gpu/share_gpu_check.csv $S/diff/diffusers_backend_check.json $S/scal/scaling_model.csv $S/scal/imbalance.csv $REAL_OUT/ 2>/dev/null
ls $REAL_OUT
