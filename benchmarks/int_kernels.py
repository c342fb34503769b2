"""Measure the integer-GEMM candidates for the deployed quantized linear (docs/runtime.md).

    PYTHONPATH=src python benchmarks/int_kernels.py [--threads 2] [--batches 1,4,8,128,512] [--reps 5]

Per shape (out x in) and token count: (min, median) ms of each candidate in one process (the machine
is shared: the minimum estimates what the kernel can do, the median what preemption left of it).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mmcompress.quant.kernels import cpu
from mmcompress.quant.quantizer import pack_int4, quantize_weight


def _med(fn, reps):
    """(min, median) ms: on a shared machine the minimum is the kernel's capability, the median what
    preemption leaves of it."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return round(1e3 * ts[0], 3), round(1e3 * ts[len(ts) // 2], 3)


def candidates(N, K, B):
    x = torch.randn(B, K)
    W = torch.randn(N, K) * 0.02
    xb, Wb = x.bfloat16(), W.bfloat16()
    c8, s8, z8 = quantize_weight(W, 8, 0, True)
    c4, s4, z4 = quantize_weight(W, 4, 128, False)
    c4s, s4s, z4s = quantize_weight(W, 4, 0, True)
    p4, p4s = pack_int4(c4), pack_int4(c4s)
    xq = torch.randint(-127, 128, (B, K), dtype=torch.int8)
    sx = torch.rand(B)
    c8t = c8.t().contiguous()
    out = {
        "torch fp32": lambda: torch.nn.functional.linear(x, W),
        "torch bf16": lambda: torch.nn.functional.linear(xb, Wb),
        "torch._int_mm (w8a8)": lambda: torch._int_mm(xq, c8t),
        "_weight_int8pack_mm (w8a16)": lambda: torch.ops.aten._weight_int8pack_mm(xb, c8, s8.reshape(-1).bfloat16()),
    }
    if cpu.available():
        ops = torch.ops.mmcompress_int
        out["own w8a8"] = lambda: ops.int8_act_gemm(xq, sx, c8, s8, z8, 8, 0, True)
        out["own w4a8 (per-channel)"] = lambda: ops.int8_act_gemm(xq, sx, p4s, s4s, z4s, 4, 0, True)
        out["own w4a8 g128 asym"] = lambda: ops.int8_act_gemm(xq, sx, p4, s4, z4, 4, 128, False)
        out["own w4a16 g128 asym"] = lambda: ops.float_act_gemm(x, p4, s4, z4, 4, 128, False)
    try:
        w32 = (c4.int() + 8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w32, 1)
        sz = torch.stack([s4, (8 - z4) * s4], -1).transpose(0, 1).contiguous().bfloat16()
        out["_weight_int4pack_mm_for_cpu (w4a16 g128)"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 128, sz)
    except Exception as e:  # noqa: BLE001
        print("int4pack unavailable:", type(e).__name__, str(e)[:100])
    try:
        pw = torch.ops.aten._dyn_quant_pack_4bit_weight(c4.int() + 8, s4.float(), None, 128, K, N)
        out["_dyn_quant_matmul_4bit (w4a8 dyn)"] = lambda: torch.ops.aten._dyn_quant_matmul_4bit(x, pw, 128, K, N)
    except Exception as e:  # noqa: BLE001
        print("dyn_quant_4bit unavailable:", type(e).__name__, str(e)[:100])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,8,128")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for shp in a.shapes.split(","):
        N, K = map(int, shp.split("x"))
        for B in map(int, a.batches.split(",")):
            reps = a.reps if B <= 8 else max(3, a.reps // 3)
            cands = candidates(N, K, B)
            res = {}
            for name, fn in cands.items():
                try:
                    res[name] = _med(fn, reps)
                except Exception as e:  # noqa: BLE001
                    res[name] = f"error: {type(e).__name__}: {str(e)[:80]}"
            rows.append({"shape": shp, "batch": B, "ms": res})
            print(json.dumps(rows[-1]) if a.json else f"{shp} B={B}: " + ", ".join(f"{k} {v}" for k, v in res.items()),
                  flush=True)


if __name__ == "__main__":
    main()
