#!/usr/bin/env bash
# SmoothQuant vs MASQuant at W4A8 on omni-mini over calibration seeds 0, 1, 2 (128 samples each), every model
# saved by `mmcompress quantize` and scored by masquant_eval_saved.py.  Results: runs/seeds/*.eval.
set -eu
M=$(python -c "from mmcompress_testbed.registry import fetch; print(fetch('omni-mini'))")
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
run() {  # method seed extra...
  local meth=$1 seed=$2; shift 2
  mmcompress quantize $M --method $meth "$@" --scheme w4a8 --calib testbed --nsamples 128 --seqlen 128 --seed $seed \
      --output runs/seeds/${meth}_s$seed --no-progress --json > runs/seeds/${meth}_s$seed.qlog 2>&1
  python benchmarks/masquant_eval_saved.py runs/seeds/${meth}_s$seed > runs/seeds/${meth}_s$seed.eval 2>&1
}
mkdir -p runs/seeds
(run masquant 1 --epochs 2) &
(run masquant 2 --epochs 2) &
(for s in 0 1 2; do run smoothquant $s --runtime-smoothing; done; run masquant 0 --epochs 2) &
wait
