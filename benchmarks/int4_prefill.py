"""Prefill of int4-weight int8-activation layers: our kernel against the torch path (``_int_mm`` after
unpacking the codes), through ``kernels.int_matmul`` with its dispatch (``path_for``) forced either way.

    python benchmarks/int4_prefill.py [--threads 2] [--reps 5]

Prints mean ms per call (after two warm-up calls) for per-channel W4A8 at 128 and 512 rows; both paths run
in this one process, so on a shared machine only their ratio means something.
"""

import argparse
import time

import torch

import mmcompress.quant.kernels as K
from mmcompress.quant.quantizer import pack_int4, quantize_weight, resolve_scheme

SHAPES = [(576, 576), (1536, 576), (4096, 4096), (11008, 4096)]


def _ms(f, reps: int) -> float:
    for _ in range(2):  # warm-up (the first call of a process also starts the OpenMP team)
        f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scheme = resolve_scheme("w4a8")
    dispatch = K.path_for
    print("| out × in | rows | ours (ms) | torch (ms) | torch / ours |\n|---|---|---|---|---|")
    for n, k in SHAPES:
        q, s, z = quantize_weight(torch.randn(n, k), 4, 0, True)
        codes = pack_int4(q)
        for rows in (128, 512):
            x = torch.randn(rows, k)
            res = {}
            for name, path in (("ours", "cpu"), ("torch", "torch")):
                K.path_for = lambda *a, path=path, **kw: path
                res[name] = _ms(lambda: K.int_matmul(x, codes, s, z, scheme, k), args.reps)
            K.path_for = dispatch
            print(f"| {n} × {k} | {rows} | {res['ours']:.2f} | {res['torch']:.2f} | {res['torch'] / res['ours']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
