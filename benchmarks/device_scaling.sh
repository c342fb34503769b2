#!/usr/bin/env bash
# Issue 21's MASQuant W4A8 rows on one GPU (device tool): random Llama checkpoints of TinyLlama width (22 layers)
# and LLaMA-2-7B shape (32 layers), bf16, built on the device machine by random_llama.py, then
#   mmcompress quantize MODEL --method masquant --scheme w4a8 --calib calib.txt --nsamples 8 --seqlen 256 --device cuda
# streamed, under benchmarks/measure_run.py (wall, CPU s, peak host RSS, bytes written, peak GPU memory).
# Needs TOK (a tokenizer dir with config.json: smollm2-135m's) and CALIB (a text file); SECONDS_LEFT bounds the
# whole script (each quantize gets what is left, and reports how far it got if it is stopped).
set -o pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
: "${TOK:?set TOK}" "${CALIB:?set CALIB}" "${SECONDS_LEFT:=240}"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${WORK:-/tmp/mmc-scaling}; mkdir -p "$W"
end=$(( $(date +%s) + SECONDS_LEFT ))
left() { echo $(( end - $(date +%s) )); }
run_row() {  # name model_dir
  local t; t=$(left); [ "$t" -gt 20 ] || { echo "skip $1: no time left"; return; }
  timeout "$t" python3 benchmarks/measure_run.py -- python3 -m mmcompress.cli quantize "$2" \
    --method masquant --scheme w4a8 --calib "$CALIB" --nsamples 8 --seqlen 256 --device cuda --json --output "$W/$1-out" \
    2>&1 | tee "$OUT/$1.log"
  du -sb "$W/$1-out" 2>/dev/null
}
python3 benchmarks/random_llama.py "$W/l22" --layers 22 --tokenizer "$TOK" && run_row masquant-l22 "$W/l22"
rm -rf "$W/l22" "$W/masquant-l22-out"
python3 benchmarks/random_llama.py "$W/l7b2" --layers 2 --hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32 --tokenizer "$TOK" &&
  python3 benchmarks/random_llama.py "$W/l7b" --layers 32 --hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32 \
    --tokenizer "$TOK" --repeat "$W/l7b2" && run_row masquant-l7b "$W/l7b"
echo "device_scaling done"
