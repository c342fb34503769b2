"""The sparse int8 GEMV (``sparse_gemv.cpp``'s ``indexed_int8_gemv``, what ``SparseInt8Linear`` runs at decode)
in several versions side by side, one call at batch 1..8 (docs/sparse_int8.md "Kernel").

    python benchmarks/sparse_int8_variants.py [--source LABEL=FILE ...] [--groups 1,2,4]
        [--shapes 4096x4096,11008x4096,4096x11008] [--sparsity 0.4] [--batch 1] [--threads 1]
        [--clock thread] [--thp] [--json FILE]

``cur`` is the working tree's ``sparse_gemv.cpp``; ``--groups G,...`` builds it once per value of
``MMC_INT8_GROUPS`` (VNNI interleaves of 4 kept rows per pass at batch 1 — every pass since session 42; before,
and at batch 2-8 still, only when the accumulator exceeds ``MMC_INT8_L1_ACC`` bytes; ``--groups 4:0`` sets that to
0) as ``gG`` / ``gG_A``; each
``--source LABEL=FILE`` adds another version (e.g. ``git show main:src/mmcompress/sparse/kernels/sparse_gemv.cpp
> /tmp/old.cpp``).  Every version is built under its own op namespace.  Per shape (OUTxIN, as
``nn.Linear.weight``) one random weight is quantized (int8, symmetric per channel), packed and copied until
the copies exceed ``--cache-mb`` (every call streams its codes from DRAM); the Top-K selection of a random
bf16 input is made once, and every version runs ``indexed_int8_gemv`` on it (activation quantization and
the epilogue included, the selection not), interleaved (order reversed every other repeat).  Outputs must
be bit-identical to the first version's.

``--clock thread`` (default) is the CPU time of the calling thread (robust to a loaded machine; meaningful
with ``--threads 1`` only); ``--clock wall`` with ``--threads 2``.  Prints median and best microseconds and
GB/s of the kept rows' codes (keep * OUT bytes).
"""

import math
import os

import torch

from kernel_variants import build_renamed, build_sources, clock_of, common_args, finish, warm_time_report
from mmcompress.quant.quantizer import quantize_weight
from mmcompress.sparse.kernels import cpu, pack_int8_weight, topk_select
from mmcompress.sparse.topk import keep_count


def build(label: str, text: str):
    return build_renamed(f"sparse_int8_variants_{label}", text, "mmcompress_sparse", "indexed_int8_gemv")


def huge_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose storage is madvise(MADV_HUGEPAGE)d before its first touch (the 2 MB-aligned
    interior; transparent huge pages in ``madvise`` mode)."""
    import ctypes
    buf = torch.empty(t.numel() + (4 << 20), dtype=torch.uint8)
    base = buf.data_ptr()
    start = (base + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(start, t.numel() // (2 << 20) * (2 << 20) + (2 << 20), 14) != 0:  # MADV_HUGEPAGE
        raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")
    off = start - base
    out = buf[off:off + t.numel()].view(t.shape)
    out.copy_(t)
    return out


@torch.no_grad()
def main() -> None:
    ap = common_args(__doc__, "4096x4096,11008x4096,4096x11008", "no plain cur build")
    ap.add_argument("--groups", default="", help="build cur once per MMC_INT8_GROUPS value (comma list)")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--thp", action="store_true",
                    help="also time every version on copies in transparent huge pages (madvise), as LABEL_thp")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = clock_of(a)
    src = cpu._SRC.read_text()
    ops = {}
    build_sources(a, build, ops)
    if not a.no_cur:
        ops["cur"] = build("cur", src)
    for gv in filter(None, a.groups.split(",")):
        groups, _, acc = gv.partition(":")
        label = f"g{int(groups)}" + (f"_{int(acc)}" if acc else "")
        defs = f"#define MMC_INT8_GROUPS {int(groups)}\n" + (f"#define MMC_INT8_L1_ACC {int(acc)}\n" if acc else "")
        ops[label] = build(label, defs + src)
    res = {"clock": a.clock, "threads": a.threads, "batch": a.batch, "sparsity": a.sparsity,
           "loadavg_before": os.getloadavg(), "rows": []}
    for shape in a.shapes.split(","):
        out, inn = map(int, shape.lower().split("x"))
        k = keep_count(inn, a.sparsity)
        nbytes = k * out
        ncopy = max(2, math.ceil(a.cache_mb * 1e6 / (out * inn)))
        g = torch.Generator().manual_seed(0)
        codes, scale, _ = quantize_weight(torch.randn(out, inn, generator=g) * 0.02, 8, 0, True)
        wq, zc = pack_int8_weight(codes)
        ws = scale.reshape(-1).float().contiguous()
        copies = [wq] + [wq.clone() for _ in range(ncopy - 1)]
        sets = {"": copies}
        if a.thp:
            sets["_thp"] = [huge_copy(wq) for _ in range(ncopy)]
        x = torch.randn(a.batch, inn, generator=g).bfloat16()
        idx, vals = topk_select(x, k)
        bias = torch.randn(out, generator=g).bfloat16()
        fns, ref = {}, None
        for suffix, cs in sets.items():
            for label, o in ops.items():
                f = (lambda i, o=o, cs=cs: o.indexed_int8_gemv(idx, vals, cs[i], ws, zc, None, bias, 8, torch.bfloat16))
                y = f(0)
                if ref is None:
                    ref = y
                elif not torch.equal(y, ref):
                    raise SystemExit(f"{label}{suffix}: output differs from the first version's (must be bit-identical)")
                fns[label + suffix] = f
        res["rows"] += warm_time_report(shape, fns, {n: ncopy for n in fns}, {n: nbytes for n in fns}, a.repeats,
                                        clock, 8)
    finish(res, a, f"batch {a.batch}, sparsity {a.sparsity}")

if __name__ == "__main__":
    main()
