#!/bin/bash
# Evaluate the GPU-scale embedded model in one device call (from the repository root):
#   bash benchmarks/device/embedded_gpu_eval.sh [STAGES]     (default: "search bench demo share")
#   search  dense captures of the tuning prompts (seed 0) and the offline Compact search at tau 0.9 / 0.8,
#           written beside the weights (dist_compact/models/weights/embedded-gpu-compact-{0.9,0.8}.yaml)
#   bench   benchmarks/quality_speed.py: every mode, 96 held-out clips (seeds 1000+), CSV + JSON + PNG
#   demo    the demo sparsity chosen from the benchmark (configs/sparsity/embedded-gpu-demo.yaml), then
#           generate.py --config configs/models/embedded-gpu.yaml --compare-dense (its printed lines)
#   tests   the GPU runs of the op, search and sparse-attention tests (cuDNN on sliced tail padding, the sync
#           report, forwards and searches that never wait for the GPU); their log comes back in eval.tar.gz
#   share   ranks sharing the GPU (Ulysses 2/4, ring 2/4, hybrid 2x2) equal one process on this model
#   profile where a step's time goes (benchmarks/step_profile.py: attention, the rest of the forward, the
#           sampler; the Compact cases in both Hopper-kernel tile orders; a kernel table), the host
#           synchronisations of every case (--syncs), then the online search's cost at this shape
#           (benchmarks/search_overhead.py)
# Writes under $OUT: eval.tar.gz (logs, CSVs, JSON, searched configs, demo report), pareto.png; live.tar.gz, the same
# taken every 20 s. MODES=compact,adaspa limits the bench to those modes (dense always runs).
set -u
export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1
STAGES=${1:-search bench demo share}
B=/tmp/eval; mkdir -p $B
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $B/steps.log; tar czf $OUT/eval.tar.gz -C /tmp eval; }
# a copy every 20 s besides, so a call cut off by its time limit still returns what each stage wrote so far
# (quality_speed.py writes its CSV / JSON / PNG after every mode)
( while sleep 20; do tar czf $OUT/live.tar.gz -C /tmp eval; done ) >/dev/null 2>&1 &
LIVE=$!
trap 'kill $LIVE 2>/dev/null' EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $B/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $B/gpu.txt
W=dist_compact/models/weights
# weights trained by train_embedded_gpu.sh in an earlier call on this (warm) machine win over the tracked ones
if [ -f outputs/embedded-gpu/embedded-gpu.safetensors ]; then cp outputs/embedded-gpu/embedded-gpu.safetensors* $W/; fi
sha256sum $W/embedded-gpu.safetensors | tee -a $B/gpu.txt
M=configs/models/embedded-gpu.yaml
for S in $STAGES; do
  stamp "$S"
  case $S in
  search)
    timeout ${SEARCH_S:-150} python3 -m dist_compact.cli.search capture --out-dir /tmp/mass --capture-steps 4,8,12,16 \
      --prompt "a green circle moving right" --prompt "a purple square bouncing on a checkerboard" \
      --prompt "an orange triangle moving down on a gradient" --prompt "a white square moving up" \
      -- --config $M --run.video false --run.progress false > $B/capture.log 2>&1 || tail -5 $B/capture.log
    for TAU in 0.9 0.8; do
      timeout 60 python3 -m dist_compact.cli.search search /tmp/mass/mass_*.pt --out $W/embedded-gpu-compact-$TAU.yaml \
        --tau $TAU --model embedded-gpu --device cuda 2>&1 | tail -1 | tee -a $B/steps.log
      cp $W/embedded-gpu-compact-$TAU.yaml $B/ 2>/dev/null
    done ;;
  bench)
    timeout ${BENCH_S:-330} python3 benchmarks/quality_speed.py --config $M \
      --compact 0.9=$W/embedded-gpu-compact-0.9.yaml --compact 0.8=$W/embedded-gpu-compact-0.8.yaml \
      --densities from-compact ${MODES:+--modes $MODES} --limit ${LIMIT:-96} --csv $B/quality_speed.csv --clips-csv $B/quality_speed_clips.csv \
      --json $B/quality_speed.json --png $OUT/pareto.png > $B/bench.log 2>&1; tail -16 $B/bench.log ;;
  demo)  # the demo sparsity chosen from the benchmark by quality_speed.py's rule, then the README's command
    python3 benchmarks/quality_speed.py --choose $B/quality_speed.json \
      --sparsity-out configs/sparsity/embedded-gpu-demo.yaml | tee -a $B/steps.log
    cp configs/sparsity/embedded-gpu-demo.yaml $B/
    timeout ${DEMO_S:-90} python3 generate.py --config $M --compare-dense --run.video false --output-dir /tmp/runs \
      --name demo 2>&1 | grep -v "^\s*$" | tail -4 | tee $B/demo.log
    cp /tmp/runs/demo/report.json $B/demo_report.json 2>/dev/null
    cp /tmp/runs/demo/frames.png $OUT/demo_frames.png 2>/dev/null ;;
  profile)
    timeout ${PROFILE_S:-240} python3 benchmarks/step_profile.py --repeats 2 --orders natural,longest \
      --csv $B/step_profile.csv --kernels $B/step_kernels.txt > $B/profile.log 2>&1; grep -v "^#" $B/profile.log | head -24
    timeout ${SYNCS_S:-100} python3 benchmarks/step_profile.py --syncs $B/step_syncs.txt > $B/syncs.log 2>&1
    grep "^## " $B/step_syncs.txt
    timeout ${OVERHEAD_S:-90} python3 benchmarks/search_overhead.py --grid 16 32 32 --tile 2 8 8 --text 12 \
      --text-position after --heads 4 --batch 2 --query-rows 32 --steps 20 --dense-threshold 1 \
      --csv $B/search_overhead.csv > $B/search_overhead.log 2>&1; tail -12 $B/search_overhead.log ;;
  tests)
    timeout ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider tests/core/test_ops.py \
      tests/sparsity/test_online_search.py tests/sparsity/test_sparse_attention.py \
      "tests/models/test_embedded_model.py::test_denoising_forwards_never_wait_for_the_gpu" \
      "tests/benchmarks/test_scripts.py::test_step_profile_counts_host_syncs" \
      -k "not sequence_parallel" > $B/tests.log 2>&1  # the spawned-rank equality runs on the CPU anyway
    tail -3 $B/tests.log ;;
  share)
    # about 150 s for the one-process references alone on an H100, then one launch per rank count
    ONLY_MODELS=embedded-gpu OUT=$B timeout ${SHARE_S:-480} bash benchmarks/device/share_gpu_check.sh > $B/share.log 2>&1
    tail -12 $B/share.log ;;
  esac
done
stamp end
ls -la $OUT
