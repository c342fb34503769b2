#!/usr/bin/env python
"""Compile every Triton sparse kernel variant for a CUDA target without a GPU (ahead of time).

    python benchmarks/triton_compile_check.py              # sm_90 (H100/H200), all configs, fp16/bf16/fp32
    python benchmarks/triton_compile_check.py --arch 80 --quick

Catches what Triton's CPU interpreter does not: type/layout errors of the real compiler, and register
spills (``ptxas -v`` on the generated PTX, with the ptxas bundled in the Triton wheel).  Launch-time
specialisation is mimicked: pointers 16-byte aligned, N/K/strides divisible by 16 (the 7B shapes).
Exit status 1 if any variant fails to compile.  Needs ``triton`` (no CUDA, no GPU).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles the real kernels")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmcompress.sparse.kernels import triton_gemv as tg  # noqa: E402

TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def ptxas_info(ptx: str, arch: int) -> str:
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except Exception:  # older Triton
        ptxas = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                            str(p), "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True)
    out = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"regs {regs.group(1) if regs else '?'} spill {spill.group(1) if spill else '?'}B"


def compile_one(fn, signature, constexprs, div_args, warps, arch):
    names = fn.arg_names
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div_args}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return ptxas_info(c.asm["ptx"], arch)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="one config per variant, bf16 only")
    a = ap.parse_args()
    t0 = time.time()
    fails, n = [], 0
    dtypes = ["bf16"] if a.quick else ["fp16", "bf16", "fp32"]
    low = {"fp16": 13, "bf16": 16, "fp32": 0}
    # threshold kernel
    for dt in dtypes:
        for one, block in ((True, 4096), (True, 16384), (True, 32768), (False, 8192)):
            warps = max(4, min(16, block // 256))
            sig = {"X": TY[dt], "THR": "*fp32", "CUT": "*i32", "D": "i32", "K": "i32", "stride_xb": "i32"}
            try:
                info = compile_one(tg._topk_threshold_kernel, sig, {"BLOCK_D": block, "ONE_CHUNK": one,
                                                                     "LOW_BIT": low[dt]},
                                   ["X", "THR", "CUT", "D", "stride_xb"], warps, a.arch)
                print(f"ok   threshold {dt} BLOCK_D={block} one_chunk={one} warps={warps}: {info}", flush=True)
            except Exception as e:
                fails.append(f"threshold {dt} {block} {one}: {type(e).__name__}: {e}")
                print("FAIL", fails[-1], flush=True)
            n += 1
    # GEMV variants
    for dt in dtypes:
        for B in ((1, 8) if a.quick else (1, 2, 4, 8)):
            cfgs = tg.candidate_configs(B)
            if a.quick:
                cfgs = [next(c for c in cfgs if c[0] == v) for v in ("rows", "splitk")]
            for variant, bk, bn, warps in cfgs:
                for mode, has_bias in (((2, True), (0, False), (1, False)) if not a.quick else ((2, True),)):
                    fn = tg._rows_gemv if variant == "rows" else tg._splitk_gemv
                    yty = TY[dt] if variant == "rows" else "*fp32"
                    sig = {"X": TY[dt], "THR": "*fp32", "CUT": "*i32", "WT": TY[dt], "BIAS": TY[dt], "Y": yty, "N": "i32", "K": "i32",
                           "stride_xb": "i32", "stride_wk": "i32", "stride_yb": "i32", "thr_val": "fp32"}
                    cx = {"B": B, "B_PAD": tg._b_pad(B), "THR_MODE": mode, "HAS_BIAS": has_bias, "BLOCK_K": bk,
                          "BLOCK_N": bn}
                    tag = f"{variant} {dt} B={B} ({bk},{bn},{warps}) thr_mode={mode} bias={has_bias}"
                    try:
                        info = compile_one(fn, sig, cx, ["X", "THR", "CUT", "WT", "BIAS", "Y", "N", "K", "stride_xb",
                                                         "stride_wk", "stride_yb"], warps, a.arch)
                        print(f"ok   {tag}: {info}", flush=True)
                    except Exception as e:
                        fails.append(f"{tag}: {type(e).__name__}: {str(e)[:500]}")
                        print("FAIL", fails[-1], flush=True)
                    n += 1
    print(f"{n - len(fails)}/{n} compiled for sm_{a.arch} with triton {triton.__version__} in {time.time() - t0:.0f} s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
