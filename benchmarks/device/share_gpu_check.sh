#!/usr/bin/env bash
# Ranks sharing ONE GPU: every layout (Ulysses 2/4, ring 2/4, hybrid 2x2) of generate's
# pipeline with the embedded model and the random-weight HunyuanVideo / Wan transformers (few layers)
# equals one process at bf16 tolerance, through gloo with CUDA tensors, the staged ring and the GPU
# kernels (Gluon where blocks are 128). One device call, from the repository root:
#   bash benchmarks/device/share_gpu_check.sh              # writes $OUT/share_gpu/{share_gpu_check.csv,runs/,...}
# Needs diffusers for the random models: carry .whl/ (diffusers-0.42.1 and importlib_metadata wheels),
# installed here with --no-deps; without diffusers only the embedded model runs (the table says so).
# Expected: ~4-5 minutes on an H200 (three launches: the references in bf16 and float32, torchrun 2, torchrun 4).
# Environment: VARIANT (share_gpu_check.py --variant, default "default"), PS (rank counts, default "2 4"),
# ONLY_MODELS (e.g. hunyuan_video,wan; default every model that can run here).
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:$PWD/kernels
OUT=${OUT:-$PWD/outputs}
DIR=$OUT/share_gpu
mkdir -p "$DIR"
PY=${PYTHON:-python3}
if ! $PY -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps .whl/diffusers-*.whl .whl/importlib_metadata-*.whl 2>&1 | tail -2
fi
MODELS=embedded
if $PY -c "import diffusers" 2>/dev/null; then MODELS=embedded,hunyuan_video,wan; else echo "no diffusers: embedded model only"; fi
MODELS=${ONLY_MODELS:-$MODELS}
VARIANT=${VARIANT:-default}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
t0=$(date +%s)
$PY benchmarks/device/share_gpu_check.py --reference --models $MODELS --variant $VARIANT --out "$DIR" || exit 1
for P in ${PS:-2 4}; do
  $PY -m torch.distributed.run --standalone --nproc-per-node $P benchmarks/device/share_gpu_check.py \
      --models $MODELS --variant $VARIANT --out "$DIR" 2>&1 | grep -v "^W[0-9]* \|OMP_NUM_THREADS\|^\*\*\*\*" | tail -40
done
$PY benchmarks/device/share_gpu_check.py --summary --out "$DIR"
rc=$?
echo "total $(( $(date +%s) - t0 )) s"
exit $rc
