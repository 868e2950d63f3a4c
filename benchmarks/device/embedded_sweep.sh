#!/bin/bash
# Compact capture + search for the embedded model (tiles 2x4x4 and 1x4x4) and the sparse-vs-dense
# quality sweep of the main job (writes under $OUT; run after the weights are in place).
set -u
export PYTHONPATH=${PYTHONPATH:-}:$PWD:$PWD/kernels
P=(--prompt "a green circle moving right" --prompt "a purple square bouncing on checkerboard"
   --prompt "an orange triangle moving down on a gradient" --prompt "a white square moving up")
for T in ${TILES:-2,4,4 1,4,4}; do
  N=${T//,/}
  timeout 100 python3 -m dist_compact.search capture --out-dir $OUT/mass$N --capture-steps 4,8,12,16 "${P[@]}" \
    -- --config configs/cluster/1gpu.yaml --run.video false --model.tile $T > $OUT/capture$N.log 2>&1 || tail -5 $OUT/capture$N.log
  for TAU in ${TAUS:-0.9 0.95}; do
    timeout 60 python3 -m dist_compact.search search $OUT/mass$N/mass_*.pt --out $OUT/compact-$N-$TAU.yaml \
      --tau $TAU --model embedded 2>&1 | tail -1
  done
done
S="sparsity.sparsity=0.7"
if [ -n "${VARIANTS:-}" ]; then  # a file of variants, one per line ($OUT expanded)
  mapfile -t V < <(sed "s|\$OUT|$OUT|g" "$VARIANTS")
  ARGS=(); for v in "${V[@]}"; do ARGS+=(--variant "$v"); done
  timeout 300 python3 benchmarks/embedded_quality.py --csv $OUT/embedded_quality.csv "${ARGS[@]}" > $OUT/quality.log 2>&1
  grep -v "^{" $OUT/quality.log | tail -16; exit 0
fi
timeout 300 python3 benchmarks/embedded_quality.py --csv $OUT/embedded_quality.csv \
  --variant "adaspa-0.25=" \
  --variant "adaspa-0.3=$S" \
  --variant "adaspa-0.3-tile144=$S;model.tile=1,4,4" \
  --variant "adaspa-0.3-warm15=$S;sparsity.dense_steps=15;sparsity.search_steps=15,30" \
  --variant "adaspa-0.3-4searches=$S;sparsity.search_steps=10,20,30,40;sparsity.search_kinds=fused,cached,cached,cached" \
  --variant "adaspa-0.3-tile144-4searches=$S;model.tile=1,4,4;sparsity.search_steps=10,20,30,40;sparsity.search_kinds=fused,cached,cached,cached" \
  --variant "adaspa-0.3-tile144-fused4=$S;model.tile=1,4,4;sparsity.search_steps=10,20,30,40;sparsity.search_kinds=fused,fused,fused,fused" \
  --variant "adaspa-0.2-tile144-fused4=sparsity.sparsity=0.8;model.tile=1,4,4;sparsity.search_steps=10,20,30,40;sparsity.search_kinds=fused,fused,fused,fused" \
  --variant "compact244-0.95=sparsity.mode=compact;sparsity.compact_config=$OUT/compact-244-0.95.yaml" \
  --variant "compact144-0.9=sparsity.mode=compact;sparsity.compact_config=$OUT/compact-144-0.9.yaml;model.tile=1,4,4" \
  --variant "compact144-0.95=sparsity.mode=compact;sparsity.compact_config=$OUT/compact-144-0.95.yaml;model.tile=1,4,4" \
  --variant "compact144-0.9+adaspa0.1=sparsity.mode=compact+adaspa;sparsity.compact_config=$OUT/compact-144-0.9.yaml;model.tile=1,4,4;sparsity.sparsity=0.9" \
  > $OUT/quality.log 2>&1; grep -v "^{" $OUT/quality.log | tail -16
