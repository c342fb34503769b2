#!/usr/bin/env bash
# Issue 17 item 2: MASQuant as published (free training of s_m, --divergence free) next to the default
# divergence budget, and "CMC vs split" with both trained under the same divergence setting.  omni-mini
# W4A8 per channel, calibration seed 0, the same arguments as fidelity_seeds.sh (8 calibration samples,
# 1 epoch, held-out SQNR on 8 testbed-heldout samples, perplexity on 2 x 512 tokens), so the rows sit next
# to its w4a8_masquant_s0 (default: CMC, budget r = 32).  One row at a time, one thread.
set -u
OUT=${OUT:-runs/fidelity}
ARGS=${ARGS:---nsamples 8 --report-nsamples 8 --seqlen 128 --epochs 1 --ppl-windows 2 --asr 0 --vqa 0}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
mkdir -p $OUT/logs
for m in ${METHODS:-masquant-free masquant-split masquant-free-full masquant-split-free}; do
  [ -f $OUT/rows/w4a8_${m}_s0.json ] && continue
  nice -n 19 python benchmarks/fidelity_seeds.py run --scheme w4a8 --method $m --seed 0 --out $OUT $ARGS \
      > $OUT/logs/w4a8_${m}_s0.log 2>&1
done
python benchmarks/fidelity_seeds.py table --out $OUT
