"""Data-free RTN W8A8 of an existing checkpoint against ``cp`` of its safetensors, interleaved, same disk.

    python benchmarks/datafree_vs_cp.py MODEL_DIR --workdir /tmp/x --repeats 3 [--scheme w8a8]

Each repeat: read the shards once (``cat`` to /dev/null: a warm page cache for what follows, as far as the
machine's memory holds it), ``cp`` the shards into the work directory under GNU ``time -v``, then ``sync``
the copies (``cp`` returns before its bytes are on disk; ``quantize`` fsyncs its artifact before it returns),
delete them; read the shards again; ``mmcompress quantize MODEL --method rtn --scheme SCHEME --output OUT``
(no ``--calib``) under ``time -v``, delete the output.  Every command runs with the script's own niceness.
Prints one JSON object: every run (wall s, CPU s = user + system, peak RSS, bytes written = "File system
outputs" x 512, the 1-minute load average before it) and per command the best and the median.
``--keep-first DIR`` keeps the first quantized output there (to compare it with another build's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from datafree_rtn import run_timed  # this folder is on sys.path when the script runs


def timed(cmd: list[str]) -> dict:
    load = os.getloadavg()[0]
    wall, field = run_timed(cmd)
    return {"wall_s": round(wall, 2), "cpu_s": round(field(r"User time \(seconds\)") + field(r"System time \(seconds\)"), 2),
            "peak_rss_mib": round(field(r"Maximum resident set size \(kbytes\)") / 1024, 1),
            "bytes_written": int(field("File system outputs")) * 512, "load_1min": round(load, 1),
            "at": time.strftime("%H:%M:%S", time.gmtime())}


def summary(runs: list[dict]) -> dict:
    walls, cpus = [r["wall_s"] for r in runs], [r["cpu_s"] for r in runs]
    return {"best_wall_s": min(walls), "median_wall_s": statistics.median(walls),
            "best_cpu_s": min(cpus), "median_cpu_s": statistics.median(cpus)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--workdir", required=True, help="an empty or new directory on the disk to measure")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scheme", default="w8a8")
    ap.add_argument("--keep-first", help="keep the first quantized output in this (new) directory")
    args = ap.parse_args()
    model, work = Path(args.model), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        sys.exit(f"{work} is not empty")
    shards = sorted(map(str, model.glob("*.safetensors")))
    runs: dict[str, list] = {"read_once": [], "cp": [], "sync_after_cp": [], "cp_plus_sync": [], "quantize": []}
    quantize = [sys.executable, "-m", "mmcompress.cli", "quantize", str(model), "--method", "rtn", "--scheme",
                args.scheme, "--no-progress", "--output"]
    for rep in range(args.repeats):
        runs["read_once"].append(timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *shards]))
        copy = work / "copy"
        copy.mkdir()
        runs["cp"].append(timed(["cp", *shards, str(copy)]))
        runs["sync_after_cp"].append(timed(["sync", *map(str, copy.iterdir())]))
        runs["cp_plus_sync"].append({k: round(runs["cp"][-1][k] + runs["sync_after_cp"][-1][k], 2)
                                     for k in ("wall_s", "cpu_s")})
        shutil.rmtree(copy)
        runs["read_once"].append(timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *shards]))
        out = work / "out"
        runs["quantize"].append(timed([*quantize, str(out)]))
        runs["quantize"][-1]["artifact_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        if rep == 0 and args.keep_first:
            os.rename(out, args.keep_first)
        else:
            shutil.rmtree(out)
        print(json.dumps({"repeat": rep, "cp": runs["cp"][-1], "sync": runs["sync_after_cp"][-1],
                          "quantize": runs["quantize"][-1]}), file=sys.stderr)
    result = {"model": str(model), "checkpoint_bytes": sum(os.path.getsize(s) for s in shards), "cpus": os.cpu_count(),
              "niceness": os.nice(0), "command": " ".join(quantize[2:]) + " OUT", "runs": runs,
              "summary": {k: summary(v) for k, v in runs.items() if k != "read_once"}}
    q, c, cs = (result["summary"][k] for k in ("quantize", "cp", "cp_plus_sync"))
    result["ratio_median_wall_to_cp"] = round(q["median_wall_s"] / c["median_wall_s"], 2)
    result["ratio_median_wall_to_cp_plus_sync"] = round(q["median_wall_s"] / cs["median_wall_s"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
