#!/usr/bin/env python
"""One sparse GEMV vs dense, cold cache: the product's sparse kernels (``mmcompress.sparse.kernels``) on one
linear ``W [OUT, IN]``.

    python benchmarks/kernel_bench.py --shape 4096x11008 --sparsity 0.4 --dtype bf16 --batch 1 [--scheme w8a8] --json

``--shape 4096x11008`` is LLaMA-2-7B's down_proj, ``11008x4096`` its gate/up_proj.  Cold cache: the
benchmark rotates through enough weight copies to exceed the last-level cache (``--cache-mb``, default
1200 MB per layout; capped by ``--max-mb``), so every call streams its weight from DRAM as in real
decoding.  Dense (``F.linear`` on the row-major weight, same dtype) and sparse (the backend's kernel on
``WT``, Top-K selection included) are timed interleaved in the same process; the reported ratio is
median(sparse) / median(dense).  Also: the kernel at 0% sparsity (no selection) and the Top-K selection
alone (its share), torch in the other float dtype, and every sparse kernel against the fastest dense GEMV
(``best_dense``: torch bf16, torch fp32 or our kernel at 0 %) as well as against torch bf16.
``--scheme w8a8`` adds the sparse int8 kernel (Top-K + per-token int8 activations × int8 weights) and that
kernel at 0 %.  On a shared machine set ``OMP_WAIT_POLICY=PASSIVE`` (``speed_common.py``).  The CPU only;
GPU checks: ``benchmarks/gpu_check.py``.  (Until session 31 this was ``mmcompress bench kernel``.)
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mmcompress.quant.quantizer import quantize_weight
from mmcompress.sparse.kernels import (pack_int8_weight, resolve_backend, sparse_int8_linear, sparse_int8_reference,
                                       sparse_linear, topk_select)
from mmcompress.sparse.topk import keep_count
from speed_common import add_run_args, dtype_named, run


def parse_shape(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", s)
    if not m:
        raise ValueError(f"--shape must look like OUTxIN (e.g. 4096x11008), got {s!r}")
    out, inn = int(m.group(1)), int(m.group(2))
    if out <= 0 or inn <= 0:
        raise ValueError(f"--shape dimensions must be positive, got {s!r}")
    return out, inn


def _median_us(ts) -> float:
    return statistics.median(ts) * 1e6


def _int8_weight(w: torch.Tensor):
    """Symmetric per-output-channel int8 codes of ``w`` in the sparse int8 kernel's layout."""
    codes, scale, _ = quantize_weight(w.float(), 8, 0, True)
    wq, zc = pack_int8_weight(codes)
    return wq, scale.reshape(-1).contiguous(), zc


def _best_dense(times_us: dict) -> tuple[str, float]:
    """The fastest dense GEMV among the measured ones (torch bf16, torch fp32, our kernel at 0 %)."""
    name = min(times_us, key=times_us.get)
    return name, times_us[name]


@torch.no_grad()
def kernel_benchmark(out_features: int, in_features: int, sparsity: float = 0.4, dtype="bf16", batch: int = 1,
                     backend: str = "auto", repeats: int = 20, cache_mb: float = 1200.0, max_mb: float = 3000.0,
                     seed: int = 0, scheme: str | None = None, log=None) -> dict:
    """Cold-cache dense vs sparse GEMV, interleaved in one process (see the module docstring).

    Dense candidates: torch bf16 and torch fp32 (``F.linear`` on the row-major weight) and our kernel at
    0 % (no selection); every sparse kernel is reported against the fastest of them (``best_dense``) and
    against torch bf16.  ``scheme="w8a8"`` adds the sparse int8 kernel (Top-K, per-token int8 activations,
    int8 weight codes, int32 accumulation) and the same kernel at 0 %."""
    dt = dtype_named(dtype)
    if not 1 <= batch <= 8:
        raise ValueError(f"--batch must be 1..8 (decode), got {batch}")
    if scheme not in (None, "w8a8"):
        raise ValueError(f"--scheme: only w8a8 has a sparse kernel, got {scheme!r}")
    k = keep_count(in_features, sparsity)
    be = resolve_backend(backend, "cpu")
    nbytes = out_features * in_features * torch.finfo(dt).bits // 8
    # bytes of one copy in every layout: row-major (dt), WT (dt), the other torch dtype, int8
    other = torch.float32 if dt == torch.bfloat16 else torch.bfloat16
    per_copy = 2 * nbytes + out_features * in_features * torch.finfo(other).bits // 8
    per_copy += out_features * in_features if scheme else 0
    ncopy = max(2, math.ceil(cache_mb * 1e6 / nbytes))
    ncopy = max(2, min(ncopy, int(max_mb * 1e6 // per_copy)))
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(out_features, in_features, generator=g) * 0.02).to(dt)
    Ws = [base] + [base.clone() for _ in range(ncopy - 1)]  # distinct memory, same values
    WTs = [w.t().contiguous() for w in Ws]
    Wo = [w.to(other) for w in Ws]
    x = torch.randn(batch, in_features, generator=g).to(dt)
    xo = x.to(other)

    # correctness spot check against the reference on the same selection
    idx, vals = topk_select(x, k, backend=be)  # bf16 inputs have magnitude ties: compare on one selection
    ref = sparse_linear(x.float(), WTs[0].float(), indices=idx, values=vals, backend="torch")
    got = sparse_linear(x, WTs[0], k, backend=be).float()
    rel_err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()

    tname = {torch.bfloat16: "torch_bf16", torch.float32: "torch_fp32"}
    fns = {
        "dense": lambda i: F.linear(x, Ws[i]),
        "sparse": lambda i: sparse_linear(x, WTs[i], k, backend=be),
        "kernel_dense": lambda i: sparse_linear(x, WTs[i], in_features, backend=be),
        tname[other]: lambda i: F.linear(xo, Wo[i]),
    }
    int8_err = None
    if scheme:
        Q = [_int8_weight(w) for w in Ws[:1]]
        Q += [(Q[0][0].clone(), Q[0][1], Q[0][2]) for _ in range(ncopy - 1)]
        fns["int8_sparse"] = lambda i: sparse_int8_linear(x, *Q[i], k, backend=be)
        fns["int8_at_0pct"] = lambda i: sparse_int8_linear(x, *Q[i], in_features, backend=be)
        r8 = sparse_int8_reference(x.float(), *Q[0], k)
        int8_err = ((sparse_int8_linear(x.float(), *Q[0], k, backend=be) - r8).abs().max()
                    / r8.abs().max().clamp_min(1e-12)).item()
    names = list(fns)
    offset = {n: (j * ncopy) // len(names) for j, n in enumerate(names)}  # different copies at the same moment
    times = {n: [] for n in fns}
    for n, f in fns.items():  # warm-up (page faults, thread pool, first-call dispatch)
        for i in range(ncopy):
            f(i)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for i in range(ncopy):
            for n in order:
                j = (i + offset[n]) % ncopy
                t0 = time.perf_counter()
                fns[n](j)
                times[n].append(time.perf_counter() - t0)
    pair = sorted(s / d for s, d in zip(times["sparse"], times["dense"]))
    sel = []
    for _ in range(max(50, repeats * 5)):
        t0 = time.perf_counter()
        topk_select(x, k, backend=be)
        sel.append(time.perf_counter() - t0)
    med = {n: _median_us(v) for n, v in times.items()}
    best = {n: min(v) * 1e6 for n, v in times.items()}
    dense_us, sparse_us, kd_us = med["dense"], med["sparse"], med["kernel_dense"]
    topk_us = _median_us(sel)
    torch_us = {tname[dt]: dense_us, tname[other]: med[tname[other]]}
    best_name, best_us = _best_dense({**torch_us, "kernel_at_0pct": kd_us})
    res = {
        "shape": f"{out_features}x{in_features}", "dtype": str(dt).replace("torch.", ""), "batch": batch,
        "sparsity": sparsity, "keep": k, "backend": be, "threads": torch.get_num_threads(),
        "weight_copies": ncopy, "weight_mb_rotated": round(ncopy * per_copy / 1e6, 1),
        "repeats": repeats, "samples": len(times["dense"]), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "dense_us": round(dense_us, 1), "sparse_us": round(sparse_us, 1),
        "ratio": round(sparse_us / dense_us, 3), "ratio_paired_median": round(pair[len(pair) // 2], 3),
        "ideal_ratio": round(k / in_features, 3),
        "kernel_at_0pct_us": round(kd_us, 1), "kernel_at_0pct_ratio": round(kd_us / dense_us, 3),
        "sparse_vs_kernel_at_0pct": round(sparse_us / kd_us, 3),
        "torch_bf16_us": round(torch_us["torch_bf16"], 1), "torch_fp32_us": round(torch_us["torch_fp32"], 1),
        "best_dense": best_name, "best_dense_us": round(best_us, 1),
        "sparse_vs_best_dense": round(sparse_us / best_us, 3),
        "sparse_vs_torch_bf16": round(sparse_us / torch_us["torch_bf16"], 3),
        "best_of_n_us": {n: round(v, 1) for n, v in best.items()},
        "topk_us": round(topk_us, 1), "topk_share": round(topk_us / sparse_us, 4),
        "dense_gb_s": round(nbytes / (dense_us * 1e-6) / 1e9, 1),
        "kernel_at_0pct_gb_s": round(out_features * in_features * torch.finfo(dt).bits / 8 / (kd_us * 1e-6) / 1e9, 1),
        "max_rel_err": rel_err,
    }
    if scheme:
        i8, i80 = med["int8_sparse"], med["int8_at_0pct"]
        res.update({"scheme": scheme, "int8_sparse_us": round(i8, 1), "int8_at_0pct_us": round(i80, 1),
                    "int8_sparse_vs_best_dense": round(i8 / best_us, 3),
                    "int8_sparse_vs_torch_bf16": round(i8 / torch_us["torch_bf16"], 3),
                    "int8_at_0pct_vs_best_dense": round(i80 / best_us, 3),
                    "int8_sparse_gb_s": round(k * out_features / (i8 * 1e-6) / 1e9, 1),
                    "int8_at_0pct_gb_s": round(in_features * out_features / (i80 * 1e-6) / 1e9, 1),
                    "int8_max_rel_err": int8_err})
    if log is not None:
        print(f"W {res['shape']} {res['dtype']} batch {batch}, sparsity {sparsity} (K={k}/{in_features}), "
              f"backend {be}, {res['threads']} threads, {ncopy} copies ({res['weight_mb_rotated']} MB rotated), "
              f"{res['samples']} samples each (median; best-of-n in the JSON)", file=log)
        print(f"  torch bf16 {res['torch_bf16_us']:9.1f} us   torch fp32 {res['torch_fp32_us']:9.1f} us   "
              f"our kernel at 0% {kd_us:9.1f} us ({res['kernel_at_0pct_gb_s']} GB/s)   best dense: {best_name}",
              file=log)
        print(f"  sparse {sparse_us:9.1f} us  vs best dense {res['sparse_vs_best_dense']:.3f}, vs torch bf16 "
              f"{res['sparse_vs_torch_bf16']:.3f}, vs {res['dtype']} dense {res['ratio']:.3f} (paired median "
              f"{res['ratio_paired_median']:.3f}; ideal {res['ideal_ratio']:.3f})", file=log)
        if scheme:
            print(f"  int8 sparse {res['int8_sparse_us']:9.1f} us  vs best dense {res['int8_sparse_vs_best_dense']:.3f},"
                  f" vs torch bf16 {res['int8_sparse_vs_torch_bf16']:.3f} ({res['int8_sparse_gb_s']} GB/s of codes); "
                  f"int8 at 0% {res['int8_at_0pct_us']:.1f} us ({res['int8_at_0pct_gb_s']} GB/s)", file=log)
        print(f"  top-k selection {topk_us:.1f} us = {100 * res['topk_share']:.2f}% of the sparse call", file=log)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="one sparse GEMV vs dense, cold cache (the product's kernels)")
    p.add_argument("--shape", default="4096x11008",
                   help="W's shape OUTxIN as nn.Linear.weight (4096x11008 = LLaMA-2-7B down_proj; 11008x4096 = "
                        "gate/up_proj)")
    p.add_argument("--sparsity", type=float, default=0.4, help="fraction of input channels dropped, in [0, 1)")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp32")
    p.add_argument("--batch", type=int, default=1, help="tokens per call, 1..8")
    p.add_argument("--backend", default="auto", help="cpu | torch | auto (default)")
    p.add_argument("--repeats", type=int, default=20, help="passes over the rotated weight copies (default 20)")
    p.add_argument("--cache-mb", type=float, default=1200.0, help="weight bytes rotated per layout (default 1200)")
    p.add_argument("--max-mb", type=float, default=3000.0, help="cap on all weight copies (default 3000)")
    p.add_argument("--scheme", default=None, help="w8a8: also time the sparse int8 kernel (Top-K + W8A8)")
    add_run_args(p)
    return p


def _bench(args) -> dict:
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    out, inn = parse_shape(args.shape)
    return kernel_benchmark(out, inn, args.sparsity, args.dtype, args.batch, backend=args.backend,
                            repeats=args.repeats, cache_mb=args.cache_mb, max_mb=args.max_mb, scheme=args.scheme,
                            log=sys.stderr)


def main(argv=None) -> int:
    return run(build_parser(), _bench, argv)


if __name__ == "__main__":
    sys.exit(main())
