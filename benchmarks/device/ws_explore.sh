#!/bin/bash
# One device call for the Gluon kernel's schedule variants: GPU tests of the kernel, a
# side-by-side timing of the variants, then Nsight Compute on single launches.
#   VARIANTS="ws=ws,ov=ws:ov" DENS=0.5,0.19 PROFILE="ws@0.5 ws:ov@0.5" bash benchmarks/device/ws_explore.sh
set -u
export PYTHONPATH=$PWD:$PWD/kernels
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader > $OUT/gpu.txt
timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_block_sparse_ws.py -k "not compiles" \
  > $OUT/tests.txt 2>&1; echo "rc $?" >> $OUT/tests.txt
tail -3 $OUT/tests.txt
timeout ${BENCH_S:-300} python3 benchmarks/kernel_bench.py --csv $OUT/bench.csv --rep ${REP:-500} \
  --shapes ${SHAPES:-hunyuan_video,wan} --densities ${DENS:-0.5,0.25,0.19,0.12} --variants "${VARIANTS:-ws=ws}" ${BENCH_ARGS:-} \
  > $OUT/bench.txt 2>&1; echo "rc $?" >> $OUT/bench.txt
grep -v "^#" $OUT/bench.txt | tail -40
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader >> $OUT/gpu.txt
for p in ${PROFILE:-}; do
  v=${p%@*}; d=${p#*@}
  echo "== $v density $d" >> $OUT/ncu.txt
  timeout ${NCU_S:-90} ncu --clock-control none -k regex:block_sparse --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats \
    --metrics lts__t_sector_hit_rate.pct,dram__bytes_read.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,lts__t_bytes.sum.per_second \
    python3 benchmarks/profile_ws.py --shape ${PSHAPE:-hunyuan_video} --density $d --variant $v >> $OUT/ncu.txt 2>&1
  echo "rc $?" >> $OUT/ncu.txt
done
[ -f $OUT/ncu.txt ] && grep -E "==|Throughput|Hit Rate|hit_rate|hmma|pipe_xu|dram__bytes|lts__t_bytes|Duration|Stall|Issued|Eligible|rc " $OUT/ncu.txt | head -120
exit 0
