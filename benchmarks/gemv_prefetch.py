"""The sparse bf16 GEMV (``sparse_gemv.cpp``) with each software-prefetch hint, against torch, one GEMV at batch 1.

    python benchmarks/gemv_prefetch.py [--hints t0,nta,none,ahead] [--shapes 4096x11008,11008x4096]
                                       [--sparsity 0,0.4] [--threads 1] [--clock thread] [--json FILE]
                                       [--source LABEL=FILE ...]

Builds the current ``sparse_gemv.cpp`` once per hint, each under its own op namespace and with the prefetch on
whatever the CPU (``g_prefetch`` forced to ``rows``): ``t0`` as it is (the next row group prefetched with
``__builtin_prefetch(p, 0, 3)``, in ``gemv_group`` and ``gemv_group_dot``), ``nta`` with locality 0
(PREFETCHNTA: the kernel before the fix of docs/runtime.md "Why sitting D was slow"), ``none`` without the
prefetch; ``ahead`` is the source with ``g_prefetch`` forced to ``ahead`` (each row prefetched ``ROW_AHEAD``
bytes ahead within itself, the default on AMD).  Then
times ``topk_gemv`` at each sparsity and torch bf16 / fp32 ``F.linear`` on the row-major weight, all
interleaved over enough weight copies (``--cache-mb``) that every call streams its weight from DRAM.
``--source LABEL=FILE`` adds another version of ``sparse_gemv.cpp`` as it is (e.g. an older one from
``git show REV:src/mmcompress/sparse/kernels/sparse_gemv.cpp > FILE``), timed in the same interleaving.

``--clock thread`` (default) times the CPU time of the calling thread, which on a loaded shared machine
ignores the time the thread was not running; it is meaningful with ``--threads 1`` only (OpenMP helpers'
time is not counted).  ``--clock wall`` for idle machines and ``--threads 2``.  Prints median and best
microseconds and GB/s of weight bytes read (kept rows only for the sparse kernel).
"""

import argparse
import json
import math
import os
import re
import time

import torch
import torch.nn.functional as F

from kernel_variants import build_variant, interleaved_times, report
from mmcompress.sparse.kernels import cpu

PREFETCH = re.compile(r"__builtin_prefetch\((p\[q\] \+ c), 0, 3\);")  # the next-group prefetches
DEFAULT = "const Prefetch g_prefetch = default_prefetch();"


def rename(src: str, label: str) -> str:
    """The source with its ops registered under ``gemv_prefetch_<label>`` instead of ``mmcompress_sparse``."""
    return src.replace("TORCH_LIBRARY(mmcompress_sparse,", f"TORCH_LIBRARY(gemv_prefetch_{label},").replace(
        "TORCH_LIBRARY_IMPL(mmcompress_sparse,", f"TORCH_LIBRARY_IMPL(gemv_prefetch_{label},")


def variant_source(hint: str) -> str:
    src = cpu._SRC.read_text()
    n = len(PREFETCH.findall(src))
    if n != 2 or DEFAULT not in src:
        raise SystemExit(f"expected the two T0 prefetches (gemv_group, gemv_group_dot) and {DEFAULT!r} in "
                         f"{cpu._SRC}, found {n} prefetches")
    src = src.replace(DEFAULT, f"const Prefetch g_prefetch = Prefetch::{'ahead' if hint == 'ahead' else 'rows'};")
    if hint == "nta":
        src = PREFETCH.sub(r"__builtin_prefetch(\1, 0, 0);", src)
    elif hint == "none":
        src = PREFETCH.sub(";", src)
    elif hint not in ("t0", "ahead"):
        raise SystemExit(f"unknown hint {hint!r}: t0, nta, none or ahead")
    return rename(src, hint)


def build(label: str, text: str):
    return build_variant(f"gemv_prefetch_{label}", text, "topk_gemv")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hints", default="t0,nta,none,ahead", help="comma-separated; empty: only the --source files")
    ap.add_argument("--shapes", default="4096x11008,11008x4096", help="OUTxIN as nn.Linear.weight")
    ap.add_argument("--sparsity", default="0,0.4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["thread", "wall"], default="thread")
    ap.add_argument("--cache-mb", type=float, default=1000.0)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--source", action="append", default=[], metavar="LABEL=FILE",
                    help="another sparse_gemv.cpp, timed as it is (LABEL: letters, digits, _)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    ops = {h: build(h, variant_source(h)) for h in a.hints.split(",") if h}
    for spec in a.source:
        label, _, path = spec.partition("=")
        if not re.fullmatch(r"\w+", label) or not path or label in ops:
            raise SystemExit(f"--source wants a new LABEL=FILE (LABEL: letters, digits, _), got {spec!r}")
        with open(path) as f:
            ops[label] = build(label, rename(f.read(), label))
    res = {"clock": a.clock, "threads": a.threads, "loadavg_before": os.getloadavg(), "rows": []}
    for shape in a.shapes.split(","):
        out, inn = map(int, shape.lower().split("x"))
        nbytes = out * inn * 2
        ncopy = max(2, math.ceil(a.cache_mb * 1e6 / nbytes))
        g = torch.Generator().manual_seed(0)
        base = (torch.randn(out, inn, generator=g) * 0.02).bfloat16()
        W = [base] + [base.clone() for _ in range(ncopy - 1)]
        WT = [w.t().contiguous() for w in W]
        W32 = [w.float() for w in W[: max(2, ncopy // 2)]]
        x = torch.randn(1, inn, generator=g).bfloat16()
        ref = F.linear(x.double(), base.double())
        fns = {"torch_bf16": (lambda i: F.linear(x, W[i]), nbytes),
               "torch_fp32": (lambda i: F.linear(x.float(), W32[i % len(W32)]), 2 * nbytes)}
        for sp in map(float, a.sparsity.split(",")):
            k = inn - round(sp * inn)
            for h, o in ops.items():
                fns[f"ours_{h}@{sp:g}"] = ((lambda o, k: lambda i: o.topk_gemv(x, WT[i], k))(o, k), nbytes * k // inn)
        for h, o in ops.items():  # every variant computes the same dense GEMV
            err = ((o.topk_gemv(x, WT[0], inn).double() - ref).abs().max() / ref.abs().max()).item()
            if err > 1e-2:
                raise SystemExit(f"{h}: relative error {err:.3g} against float64")
        for f, _ in fns.values():
            for i in range(ncopy):
                f(i)
        names = list(fns)
        times = interleaved_times({n: (lambda i, n=n: fns[n][0](i % ncopy)) for n in names}, ncopy, a.repeats, clock)
        res["rows"] += report(shape, times, {n: fns[n][1] for n in names}, 16)
        del W, WT, W32
    res["loadavg_after"] = os.getloadavg()
    print(f"load average {res['loadavg_before']} -> {res['loadavg_after']} ({a.clock} clock, {a.threads} thread(s))")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
