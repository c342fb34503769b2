"""``mmcompress quantize`` (data-free) with the CPU time of each pipeline stage's thread printed at the end:
reader (``_read``), quantization (``_produce``, the kernel within it), writer (``_write``), the meta skeleton.

    python benchmarks/datafree_stages.py quantize MODEL --method rtn --scheme w8a8 --no-progress --output OUT
"""

import collections
import sys
import threading
import time

T0_WALL, T0_CPU = time.perf_counter(), time.process_time()
ACC: collections.Counter = collections.Counter()
LOCK = threading.Lock()


def wrap(name, fn):
    def timed(*a, **k):
        t, w = time.thread_time(), time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            with LOCK:
                ACC[name + " cpu"] += time.thread_time() - t
                ACC[name + " wall"] += time.perf_counter() - w
    return timed


def main():
    from mmcompress.export import datafree as D
    from mmcompress.quant.kernels import rtn_cpu

    for n in ("_read", "_produce", "_write", "run"):
        setattr(D._Pipeline, n, wrap(n, getattr(D._Pipeline, n)))
    D._meta_model = wrap("meta_model", D._meta_model)
    rtn_cpu.quantize_weight_into = wrap("kernel", rtn_cpu.quantize_weight_into)
    from mmcompress.cli import main as cli

    rc = cli(sys.argv[1:])
    print({k: round(v, 2) for k, v in sorted(ACC.items())}, "process CPU s", round(time.process_time() - T0_CPU, 2),
          "wall s", round(time.perf_counter() - T0_WALL, 2), file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
