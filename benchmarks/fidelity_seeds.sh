#!/usr/bin/env bash
# Issue 17 table: RTN / SmoothQuant / MASQuant on omni-mini, W4A8 per-channel and W4 g128 A8, calibration
# seeds 0 1 2, SQNR on the held-out testbed set.  One lane (one thread) per seed.  Sized for a shared,
# overloaded 2-core machine: ARGS below (8 calibration samples, 8 held-out samples, 1 epoch, perplexity
# on 2 x 512 tokens, no WER / image QA).  Rows: $OUT/rows/*.json; then `fidelity_seeds.py table`.
set -u
OUT=${OUT:-runs/fidelity}
ARGS=${ARGS:---nsamples 8 --report-nsamples 8 --seqlen 128 --epochs 1 --ppl-windows 2 --asr 0 --vqa 0}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
mkdir -p $OUT/logs
row() {  # scheme method seed
  [ -f $OUT/rows/$1_$2_s$3.json ] && return 0
  python benchmarks/fidelity_seeds.py run --scheme $1 --method $2 --seed $3 --out $OUT $ARGS > $OUT/logs/$1_$2_s$3.log 2>&1
}
lane() {  # seed
  for s in w4a8 w4a8-g128; do for m in rtn smoothquant masquant; do row $s $m $1; done; done
}
lane 0 &
lane 1 &
lane 2 &
[ -f $OUT/rows/dense.json ] || python benchmarks/fidelity_seeds.py run --dense --out $OUT $ARGS > $OUT/logs/dense.log 2>&1
wait
python benchmarks/fidelity_seeds.py table --out $OUT
