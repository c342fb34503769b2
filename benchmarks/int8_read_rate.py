"""W8A8's decode GEMV against the rate at which this machine reads the same bytes (docs/runtime.md "W8A8 at
decode: the int8 codes at the read rate").

    python benchmarks/int8_read_rate.py [--source LABEL=FILE ...] [--shapes 11008x4096,4096x11008,4096x4096]
                                        [--threads 2] [--clock wall] [--repeats 4] [--json FILE]

Per shape, one random weight quantized per channel to int8 (symmetric), one token:
``w8a8_tiled_LABEL`` — ``int8_act_gemm`` on the codes tiled as deployed (``kernels.tile_codes``) for every
version (``cur`` = the working tree's ``int_gemm.cpp``, plus each ``--source LABEL=FILE``), ``w8a8_rows`` —
the same on row-major codes, ``dense_bf16_own`` — our dense bf16 GEMV (``topk_gemv`` at 0 %, the weight
input-channel-major as ``SparseLinear`` holds it; twice the bytes), and ``read_int64_sum`` — torch summing
the tiled codes as int64 (a plain read of the same bytes).  Every path streams its own copies from DRAM
(``--cache-mb`` per path), the calls interleaved.  GB/s of the bytes each call reads.  Each version's output
is checked against the working tree's (integer sums: equal bit for bit unless a version is meant to differ).
"""

import math
import os

import torch

from mmcompress.quant.kernels import cpu as qcpu, tile_codes
from mmcompress.quant.quantizer import quantize_weight
from mmcompress.sparse.kernels import cpu as scpu
from kernel_variants import build_renamed, build_sources, clock_of, common_args, finish, warm_time_report


def build(label: str, text: str):
    return build_renamed(f"int8_read_rate_{label}", text, "mmcompress_int", "int8_act_gemm")


@torch.no_grad()
def main() -> None:
    ap = common_args(__doc__, "11008x4096,4096x11008,4096x4096", "time only the --source files")
    ap.set_defaults(threads=2, clock="wall")
    a = ap.parse_args()
    if a.batch != 1:
        raise SystemExit("--batch: this benchmark times one token (decode)")
    torch.set_num_threads(a.threads)
    clock = clock_of(a)
    if not (qcpu.load() and scpu.load()):
        raise SystemExit("the CPU kernels do not build here")
    ops = {} if a.no_cur else {"cur": torch.ops.mmcompress_int}
    build_sources(a, build, ops)
    res = {"clock": a.clock, "threads": a.threads, "batch": 1, "loadavg_before": os.getloadavg(), "rows": []}
    for shape in a.shapes.split(","):
        out, inn = map(int, shape.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        W = torch.randn(out, inn, generator=g) * 0.02
        x = torch.randn(1, inn, generator=g)
        xq = torch.clamp(torch.round(x / (x.abs().amax(1, keepdim=True) / 127)), -127, 127).to(torch.int8)
        sx = (x.abs().amax(1) / 127).float().contiguous()
        c, s, z = quantize_weight(W, 8, 0, True)
        c = c.to(torch.int8).contiguous()
        s, z = s.float().reshape(-1, 1).contiguous(), z.float().reshape(-1, 1).contiguous()
        n8 = out * inn
        ncopy = max(2, math.ceil(a.cache_mb * 1e6 / n8))
        tiled = [tile_codes(c) for _ in range(ncopy)]
        rows = [c.clone() for _ in range(ncopy)]
        ncb = max(2, math.ceil(a.cache_mb * 1e6 / (2 * n8)))
        wts = [W.t().contiguous().bfloat16() for _ in range(ncb)]
        xb = x.bfloat16().contiguous()
        calls, copies, nbytes = {}, {}, {}
        ref = None
        for label, o in ops.items():
            y = o.int8_act_gemm(xq, sx, tiled[0], s, z, 8, 0, True)
            if ref is None:
                ref = y
            elif not torch.equal(y, ref):
                print(f"note: {label} differs from {next(iter(ops))} by {(y - ref).abs().max().item():.3g}")
            calls[f"w8a8_tiled_{label}"] = lambda i, o=o: o.int8_act_gemm(xq, sx, tiled[i], s, z, 8, 0, True)
            copies[f"w8a8_tiled_{label}"], nbytes[f"w8a8_tiled_{label}"] = ncopy, n8
        if not a.no_cur:
            calls["w8a8_rows"] = lambda i: torch.ops.mmcompress_int.int8_act_gemm(xq, sx, rows[i], s, z, 8, 0, True)
            copies["w8a8_rows"], nbytes["w8a8_rows"] = ncopy, n8
        calls["dense_bf16_own"] = lambda i: torch.ops.mmcompress_sparse.topk_gemv(xb, wts[i], inn, None)
        copies["dense_bf16_own"], nbytes["dense_bf16_own"] = ncb, 2 * n8
        calls["read_int64_sum"] = lambda i: tiled[i].view(torch.int64).sum()
        copies["read_int64_sum"], nbytes["read_int64_sum"] = ncopy, n8
        res["rows"] += warm_time_report(shape, calls, copies, nbytes, a.repeats, clock, 18)
    finish(res, a, "batch 1")


if __name__ == "__main__":
    main()
