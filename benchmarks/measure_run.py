#!/usr/bin/env python
"""Run a command and report what issue 21's scaling table needs: wall seconds, CPU seconds, the peak RSS of
the command (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), bytes written (output blocks × 512) and, where
``nvidia-smi`` exists, the GPU memory in use at its highest (sampled every 0.2 s; it includes other processes).

    python benchmarks/measure_run.py --json OUT.json -- mmcompress quantize MODEL ... --output DIR

Prints one JSON line (also written to ``--json``) and exits with the command's status.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given")
    gpu_peak, stop = [0], threading.Event()

    def sample_gpu():
        while not stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                gpu_peak[0] = max(gpu_peak[0], max(int(v) for v in out.split()))
            except Exception:
                return
            stop.wait(0.2)

    sampler = threading.Thread(target=sample_gpu, daemon=True) if shutil.which("nvidia-smi") else None
    if sampler:
        sampler.start()
    t0 = time.time()
    rc = subprocess.call(cmd)
    wall = time.time() - t0
    stop.set()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"cmd": cmd, "rc": rc, "wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
           "peak_rss_kib": ru.ru_maxrss, "bytes_written": ru.ru_oublock * 512}
    if sampler:
        res["gpu_mem_peak_mib"] = gpu_peak[0]
    line = json.dumps(res)
    print(line, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
