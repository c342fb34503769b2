#!/usr/bin/env bash
# Issue 15's speed and memory targets in one go (an idle machine; 2 threads; ~15 minutes).
#   bash benchmarks/runtime_targets.sh [OUT_DIR]
# Writes OUT_DIR/decode-*.json (the JSON line of each benchmarks/stack_decode.py run), OUT_DIR/table.md
# (benchmarks/runtime_table.py on smollm2-135m) and prints a summary.  The load average is recorded
# with every run: figures from a loaded machine measure the scheduler, not the kernels.
set -euo pipefail
out=${1:-/tmp/mmcompress-runtime-targets}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-$(cd "$(dirname "$0")/.." && pwd)/src}
run() {  # name, args...
  local name=$1; shift
  local load; load=$(cut -d' ' -f1 /proc/loadavg)
  python "$(dirname "$0")/stack_decode.py" llama2-7b:4 --tokens 16 --threads 2 --json "$@" | tail -1 > "$out/decode-$name.json"
  python - "$out/decode-$name.json" "$name" "$load" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:10s} speedup {d['speedup']:.3f}x vs {d['dense_baseline']} ({d['dense_tok_s']} tok/s); "
      f"{d['tok_s']} tok/s; weights {d['weight_bytes'] / d['dense_weight_bytes']:.3f} of bf16; load before {sys.argv[3]}")
PY
}
run w8a8 --scheme w8a8
run w4a8 --scheme w4a8
run w4a16 --scheme w4a16
run larosa40 --sparsity 0.4
run joint --sparsity 0.4 --scheme w8a8
python "$(dirname "$0")/runtime_table.py" --out "$out/artifacts" | tee "$out/table.md"
