#!/usr/bin/env bash
# Peak RSS, time and bytes written of `mmcompress quantize` streamed (the default) and --in-memory (GNU time -v;
# bytes written = "File system outputs" x 512).  MODES="stream" runs the default alone.
# usage: [MODES="memory stream"] benchmarks/stream_rss.sh MODEL_DIR OUT_DIR [quantize options...]
# e.g.   benchmarks/stream_rss.sh ~/.cache/mmcompress/testbed/qwen2.5-0.5b /tmp/rss \
#            --method smoothquant --scheme w8a8 --calib wiki --nsamples 8 --seqlen 256
set -euo pipefail
model=$1; out=$2; shift 2
mkdir -p "$out"
modes=${MODES:-memory stream}
for mode in $modes; do
  flag=""; [ "$mode" = memory ] && flag="--in-memory"
  rm -rf "$out/$mode" "$out/$mode.ckpt"
  /usr/bin/time -v mmcompress quantize "$model" "$@" --no-progress --output "$out/$mode" $flag \
      2> "$out/$mode.time" >/dev/null || { tail -5 "$out/$mode.time"; exit 1; }
  rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$out/$mode.time")
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$out/$mode.time")
  blocks=$(awk -F': ' '/File system outputs/ {print $2}' "$out/$mode.time")
  size=$(du -sb "$out/$mode" | cut -f1)
  printf '%-7s peak RSS %6.2f GB  wall %s  written %6.2f GB  artifact %6.2f GB\n' "$mode" \
      "$(echo "$rss_kb / 1048576" | bc -l)" "$wall" "$(echo "$blocks * 512 / 1073741824" | bc -l)" \
      "$(echo "$size / 1073741824" | bc -l)"
done
[ "$modes" = "memory stream" ] || exit 0
if cmp -s "$out/memory/model.safetensors" "$out/stream/model.safetensors"; then
  echo "model.safetensors: byte-identical"
else
  echo "model.safetensors: DIFFERENT"
fi
