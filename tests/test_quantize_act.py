"""``mmcompress_int::quantize_act`` (the per-token activation quantizer in ``int_gemm.cpp``) is bit-identical
to the reference :func:`~mmcompress.quant.quantizer.quantize_activation`: fp32, bf16 and fp16 inputs,
ties, huge and subnormal values, zero rows."""

import pytest
import torch

from mmcompress.quant import kernels
from mmcompress.quant.quantizer import _eps, quantize_activation

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _need_kernel():
    if not kernels._cpu.available():
        pytest.skip(f"no CPU integer kernel here ({kernels._cpu.error()})")


def _check(x, bits):
    ref_q, ref_s = quantize_activation(x, bits)
    q, s = torch.ops.mmcompress_int.quantize_act(x.contiguous(), bits, _eps(x.dtype))
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s, ref_s.float().reshape(-1)), (x.dtype, bits)
    bad = (q != ref_q).nonzero()
    assert bad.numel() == 0, (x.dtype, bits, bad[:5].tolist(), x[tuple(bad[0])].item())
    # the dispatching helper gives the same
    q2, s2 = kernels.quantize_act(x, bits)
    assert torch.equal(q2, q) and torch.equal(s2, s)


def _ties(dtype, qmax):
    """Rows whose step size is a power of two, with entries exactly halfway between codes."""
    rows = []
    for step in (1.0, 2.0, 0.5, 2.0 ** -10):
        half = torch.arange(-qmax, qmax, dtype=torch.float64) + 0.5  # -qmax+0.5 ... qmax-0.5
        row = torch.cat([torch.tensor([float(qmax)]), half, -half[:3]]) * step
        rows.append(row)
    width = max(len(r) for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_bit_identical_to_the_reference(dtype, bits):
    _need_kernel()
    g = torch.Generator().manual_seed(bits)
    qmax = 2 ** (bits - 1) - 1
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).tiny
    cases = [
        torch.randn(1, 576, generator=g),
        torch.randn(3, 4096, generator=g) * torch.logspace(-3, 3, 4096)[torch.randperm(4096, generator=g)],
        torch.randn(40, 64, generator=g),
        torch.randn(5, 7, generator=g),  # odd widths
        torch.randn(2, 1, generator=g),
        _ties(torch.float64, qmax),
        torch.zeros(2, 64),  # step size = eps
        torch.tensor([[big, -big / 3, big / 1000, 1.0], [-big, big / 7, 0.0, -1.0]], dtype=torch.float64),
        torch.tensor([[tiny, tiny / 8, -tiny / 2, 0.0], [tiny * 3, -tiny / 64, tiny / 2 ** 5, tiny / 3]],
                     dtype=torch.float64),  # normal and subnormal
        torch.tensor([[1e-12, -3e-13, 5e-11, 0.0]], dtype=torch.float64),  # below the smallest step size
    ]
    # rows over 60 orders of magnitude (fp16: its own range)
    lo, hi = (-6, 4) if dtype == torch.float16 else (-30, 30)
    mags = 10.0 ** (torch.rand(512, 1, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    cases.append(torch.randn(512, 96, generator=g, dtype=torch.float64) * mags)
    for x in cases:
        x = x.to(dtype)
        assert torch.isfinite(x).all()
        _check(x, bits)


def test_ties_round_half_to_even():
    _need_kernel()
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5]])
    q, s = torch.ops.mmcompress_int.quantize_act(x, 8, _eps(x.dtype))
    assert s.tolist() == [1.0] and q.tolist() == [[127, 0, 2, 2, 0, -2, 126, -126]]
    # and a wrong rounding would be seen: the reference agrees with round-half-even here
    assert torch.equal(q, quantize_activation(x, 8)[0])


def test_refuses_bad_input():
    _need_kernel()
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.mmcompress_int.quantize_act(torch.zeros(2, 4, dtype=torch.float64), 8, 1e-10)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.mmcompress_int.quantize_act(torch.zeros(4, 2).t(), 8, 1e-10)
