#!/bin/sh
# Run one torchrun rank's command under GNU time -v, its report in "$RANK_TIME_PREFIX.rank$RANK" (per-rank
# wall time, CPU time, peak RSS and bytes written); docs/scaling.md uses it as
#   RANK_TIME_PREFIX=/tmp/x torchrun --nproc-per-node 2 --no-python benchmarks/rank_time.sh mmcompress quantize ...
exec /usr/bin/time -v -o "${RANK_TIME_PREFIX:?set RANK_TIME_PREFIX}.rank${RANK:-0}" "$@"
