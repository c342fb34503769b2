"""The int4-weight CPU kernels of ``int_gemm.cpp`` (W4A8 ``int8_act_gemm``, W4A16 ``bf16_act_gemm``) in
several versions side by side, one GEMV at batch 1 (docs/runtime.md "The int4 kernels at decode").

    python benchmarks/int4_variants.py [--source LABEL=FILE ...] [--shapes 4096x11008,11008x4096]
                                       [--batch 1] [--threads 1] [--clock thread] [--json FILE]

``cur`` is the working tree's ``int_gemm.cpp``; each ``--source LABEL=FILE`` adds another version (e.g.
``git show main:src/mmcompress/quant/kernels/int_gemm.cpp > /tmp/old.cpp``), each built under its own op
namespace.  Per shape the W4A8 scheme (int4 per channel, symmetric) and the W4A16 scheme (int4, groups of
128, asymmetric; ``w4a16_tiled``: its codes tiled as deployed, ``kernels.tile_codes``, timed on the versions
that read tiled codes) of one random weight are packed once, copied until the copies exceed ``--cache-mb`` (every
call streams its codes from DRAM), and every version is timed on the same calls, interleaved (the order
reversed every other repeat).  Each version's output is checked against the working tree's first.

``--clock thread`` (default) is the CPU time of the calling thread (robust to a loaded machine; meaningful
with ``--threads 1`` only); ``--clock wall`` with ``--threads 2``.  Prints median and best microseconds and
GB/s of codes read (N * K / 2 bytes; ``--kernels w8a8`` adds the int8 kernel for reference, N * K).
"""

import math
import os

import torch

from mmcompress.quant.kernels import cpu as qcpu, tile_codes
from mmcompress.quant.quantizer import pack_int4, quantize_weight
from kernel_variants import build_renamed, build_sources, clock_of, common_args, finish, warm_time_report


def build(label: str, text: str):
    return build_renamed(f"int4_variants_{label}", text, "mmcompress_int", "int8_act_gemm")


def packed(W: torch.Tensor, group: int, sym: bool):
    c, s, z = quantize_weight(W, 4, group, sym)
    G = s.numel() // W.shape[0]
    return pack_int4(c).contiguous(), s.float().reshape(-1, G).contiguous(), z.float().reshape(-1, G).contiguous()


@torch.no_grad()
def main() -> None:
    ap = common_args(__doc__, "4096x11008,11008x4096", "time only the --source files")
    ap.add_argument("--kernels", default="w4a8,w4a16,w4a16_tiled")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = clock_of(a)
    ops = {} if a.no_cur else {"cur": build("cur", qcpu._SRC.read_text())}
    build_sources(a, build, ops)
    kernels = a.kernels.split(",")
    res = {"clock": a.clock, "threads": a.threads, "batch": a.batch, "loadavg_before": os.getloadavg(), "rows": []}
    for shape in a.shapes.split(","):
        out, inn = map(int, shape.lower().split("x"))
        nbytes = out * inn // 2
        ncopy = max(2, math.ceil(a.cache_mb * 1e6 / nbytes / len(kernels)))
        g = torch.Generator().manual_seed(0)
        W = torch.randn(out, inn, generator=g) * 0.02
        x = torch.randn(a.batch, inn, generator=g)
        xq = torch.clamp(torch.round(x / (x.abs().amax(1, keepdim=True) / 127)), -127, 127).to(torch.int8)
        sx = (x.abs().amax(1) / 127).float().contiguous()
        xb = x.bfloat16()
        fns = {}
        for kern in kernels:
            if kern == "w8a8":  # the int8 kernel, for reference (GB/s of its int8 codes: twice the bytes)
                c, s, z = quantize_weight(W, 8, 0, True)
                w, s, z = c.contiguous(), s.float().reshape(-1, 1).contiguous(), z.float().reshape(-1, 1).contiguous()
                copies = [w] + [w.clone() for _ in range(ncopy - 1)]
                mk = lambda o, copies=copies, s=s, z=z: lambda i: o.int8_act_gemm(xq, sx, copies[i], s, z, 8, 0, True)
            elif kern == "w4a8":
                w, s, z = packed(W, 0, True)
                copies = [w] + [w.clone() for _ in range(ncopy - 1)]
                mk = lambda o, copies=copies, s=s, z=z: lambda i: o.int8_act_gemm(xq, sx, copies[i], s, z, 4, 0, True)
            elif kern in ("w4a16", "w4a16_tiled"):
                w, s, z = packed(W, 128, False)
                w = tile_codes(w) if kern == "w4a16_tiled" else w
                copies = [w] + [w.clone() for _ in range(ncopy - 1)]
                mk = lambda o, copies=copies, s=s, z=z: lambda i: o.bf16_act_gemm(xb, copies[i], s, z, 4, 128, False)
            else:
                raise SystemExit(f"unknown kernel {kern!r}: w8a8, w4a8, w4a16 or w4a16_tiled")
            ref = None
            for label, o in ops.items():
                f = mk(o)
                try:
                    y = f(0)
                except RuntimeError as e:  # an older version that reads row-major codes only
                    if kern != "w4a16_tiled":
                        raise
                    print(f"note: {label} does not take tiled codes ({str(e).splitlines()[0]})")
                    continue
                if ref is None:
                    ref = y
                elif not torch.equal(y, ref):
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    print(f"note: {label} {kern} differs from {next(iter(ops))} by {err:.3g} (relative max)")
                    if err > 1e-5:
                        raise SystemExit(f"{label} {kern}: wrong result")
                fns[f"{kern}_{label}"] = (f, ncopy, 2 * nbytes if kern == "w8a8" else nbytes)
        res["rows"] += warm_time_report(shape, {n: v[0] for n, v in fns.items()}, {n: v[1] for n, v in fns.items()},
                                        {n: v[2] for n, v in fns.items()}, a.repeats, clock, 18)
    finish(res, a, f"batch {a.batch}")

if __name__ == "__main__":
    main()
