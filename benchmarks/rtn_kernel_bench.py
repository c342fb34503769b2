"""The one-pass RTN kernel (``quant/kernels/rtn_pack.cpp``) against the reference ``QuantLinear.packed_weight``
on one 11008 x 4096 bf16 weight (LLaMA-2-7B's MLP), one thread, CPU seconds per call (3 calls each).

    python benchmarks/rtn_kernel_bench.py
"""

import time

import torch

from mmcompress.quant.kernels import rtn_cpu
from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.quantizer import SCHEMES


def main():
    torch.set_num_threads(1)
    assert rtn_cpu.available(), rtn_cpu.error()
    w = (torch.randn(11008, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    for name in ("w8a8", "w4a16"):
        s = SCHEMES[name]
        out = {k: torch.empty(shape, dtype=dt) for k, (dt, shape) in rtn_cpu.packed_shapes(*w.shape, s).items()}
        rtn_cpu.quantize_weight_into(w, s, out)  # first touch of the output buffers
        for _ in range(3):
            t = time.process_time()
            rtn_cpu.quantize_weight_into(w, s, out)
            k = time.process_time() - t
            t = time.process_time()
            QuantLinear.packed_weight(w, s)
            r = time.process_time() - t
            print(f"{name}: kernel {k:.3f} CPU s ({k / w.numel() * 1e9:.2f} ns/weight), reference {r:.3f} CPU s "
                  f"({r / w.numel() * 1e9:.2f} ns/weight)")


if __name__ == "__main__":
    main()
