"""What torch's ``_dyn_quant_matmul_4bit`` (vLLM's Dynamic4bitLinearKernel, the CPU W4A8-int kernel) does to the
activations on this CPU: compare its output with int4 weights applied to the input quantized per token to int8
symmetrically (absmax / 127, our W4A8) and asymmetrically (min/max over [-128, 127] with a zero point).

    /path/to/.venv-vllm/bin/python benchmarks/vllm_dynq_check.py

Packs the weights as vLLM 0.32 does (codes + 8, low nibble = even column; per-channel: float32 scales
``[out, 1]``; groups: bfloat16 scales ``[out, in / g]``) and prints the max |difference| per hypothesis.
"""

import torch


def sym(x):
    s = x.abs().amax(-1, keepdim=True) / 127
    return (x / s).round().clamp(-127, 127) * s


def asym(x):
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 255
    z = (-128 - lo / s).round()
    return ((x / s).round() + z).clamp(-128, 127).sub(z) * s


def main() -> None:
    torch.manual_seed(0)
    k, n = 256, 16
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int32)
    p = codes + 8
    u8 = (p[:, 1::2] << 4 | p[:, ::2]).to(torch.uint8)
    x = torch.randn(4, k) * 0.5 + 1.5  # skewed: the two activation quantizers differ
    x[:, 0] = 20.0  # an outlier channel
    for g in (k, 64):
        if g == k:
            scale = torch.rand(n, 1) * 0.01 + 0.005
            w = codes.float() * scale
        else:
            scale = (torch.rand(n, k // g) * 0.01 + 0.005).bfloat16()
            w = codes.float() * scale.float().repeat_interleave(g, 1)
        packed = torch.ops.aten._dyn_quant_pack_4bit_weight(u8, scale, None, g, k, n)
        y = torch.ops.aten._dyn_quant_matmul_4bit(x, packed, g, k, n)
        what = "per channel" if g == k else f"group {g}"
        diffs = {name: (y - f(x) @ w.T).abs().max().item() for name, f in
                 (("unquantized x", lambda t: t), ("symmetric int8 x", sym), ("asymmetric int8 x", asym))}
        print(f"torch {torch.__version__}, {what}: max |kernel - reference| " +
              ", ".join(f"{a}: {b:.2e}" for a, b in diffs.items()))


if __name__ == "__main__":
    main()
