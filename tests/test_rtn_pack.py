"""``mmcompress_rtn::quantize_weight_`` (``quant/kernels/rtn_pack.cpp``, data-free RTN's one-pass quantizer) is
bit-identical to the reference ``QuantLinear.packed_weight`` (``quantize_weight`` + ``pack_int4``): every
scheme the CLI names and others (2..8 bits, groups that do not divide the row, odd rows), fp32, bf16 and
fp16 weights, ties, huge and subnormal values, zero rows; and it declines what it leaves to the reference."""

import pytest
import torch

from mmcompress.quant.kernels import rtn_cpu
from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.quantizer import SCHEMES, QuantScheme

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCHEME_CASES = [s for name, s in SCHEMES.items() if s.wbits < 16] + [
    QuantScheme(8, 8, 128, True), QuantScheme(8, 16, 64, False), QuantScheme(4, 8, 32, True),
    QuantScheme(3, 16, 128, False), QuantScheme(2, 8, 0, True), QuantScheme(5, 8, 100, False),
    QuantScheme(6, 16, 0, False), QuantScheme(7, 8, 48, True), QuantScheme(4, 16, 1000, False)]


def _need_kernel():
    if not rtn_cpu.available():
        pytest.skip(f"no RTN kernel here ({rtn_cpu.error()})")


def _buffers(w, scheme):
    return {k: torch.full(shape, 77, dtype=dt) for k, (dt, shape) in rtn_cpu.packed_shapes(*w.shape, scheme).items()}


def _check(w, scheme):
    ref = QuantLinear.packed_weight(w, scheme)
    out = _buffers(w, scheme)
    if not rtn_cpu.quantize_weight_into(w, scheme, out):  # declined: only where the reference overflows
        assert not (ref["weight_scale"].isfinite().all() and ref["weight_zero"].isfinite().all()), (w.dtype, scheme)
        return
    for k, r in ref.items():
        assert out[k].dtype == r.dtype and out[k].shape == r.shape, k
        assert out[k].view(torch.uint8).equal(r.contiguous().view(torch.uint8)), \
            (k, w.dtype, scheme, (out[k] != r).nonzero()[:4].tolist())


def _cases(dtype, g):
    big, tiny = torch.finfo(dtype).max, torch.finfo(dtype).tiny
    rows = torch.randn(8, 4096, generator=g) * torch.logspace(-3, 2, 4096)[torch.randperm(4096, generator=g)]
    return [
        torch.randn(96, 576, generator=g) * 0.02,
        rows,
        torch.randn(7, 129, generator=g),  # odd width, partial last groups
        torch.randn(3, 1, generator=g),
        torch.rand(5, 200, generator=g),  # no negative values (asymmetric: min clamped to 0)
        -torch.rand(5, 200, generator=g),
        torch.zeros(4, 256),  # step size = eps
        torch.tensor([[big, -big / 3, big / 1000, 1.0], [-big, big / 7, 0.0, -1.0]], dtype=torch.float64),
        torch.tensor([[tiny, tiny / 8, -tiny / 2, 0.0], [tiny * 3, -tiny / 64, tiny / 2 ** 5, tiny / 3]],
                     dtype=torch.float64),  # normal and subnormal
        torch.randint(-300, 300, (16, 512), generator=g) * 0.5,  # exact halves: ties for round half to even
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("scheme", SCHEME_CASES, ids=lambda s: s.name)
def test_bit_identical_to_the_reference(dtype, scheme):
    _need_kernel()
    g = torch.Generator().manual_seed(scheme.wbits * 100 + scheme.group_size)
    for w in _cases(dtype, g):
        _check(w.to(dtype), scheme)


def test_ties_at_every_code():
    """Rows with a power-of-two step size and entries halfway between every pair of codes."""
    _need_kernel()
    for bits in (8, 4, 3):
        qmax = 2 ** (bits - 1) - 1
        half = torch.arange(-qmax, qmax, dtype=torch.float32) + 0.5
        for step in (1.0, 0.25, 2.0 ** -12):
            w = torch.cat([torch.tensor([float(qmax)]), half, -half]) * step
            for dtype in DTYPES:
                for sym in (True, False):
                    _check(w.reshape(1, -1).to(dtype), QuantScheme(bits, 8, 0, sym))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_left_to_the_reference(value):
    _need_kernel()
    w = torch.randn(4, 64)
    w[2, 5] = value
    for scheme in (SCHEMES["w8a8"], SCHEMES["w4a16"]):
        assert not rtn_cpu.quantize_weight_into(w, scheme, _buffers(w, scheme))


def test_negative_zero_minimum_left_to_the_reference():
    """An asymmetric group with -0.0 and no negative value: the reference's zero point's sign depends on
    ATen's reduction; the kernel declines (symmetric groups are unaffected)."""
    _need_kernel()
    w = torch.rand(2, 128)
    w[1, 7] = -0.0
    assert not rtn_cpu.quantize_weight_into(w, SCHEMES["w4a16"], _buffers(w, SCHEMES["w4a16"]))
    _check(w, SCHEMES["w8a8"])


def test_declines_without_the_kernel(monkeypatch):
    monkeypatch.setitem(rtn_cpu._STATE, "loaded", False)
    monkeypatch.setitem(rtn_cpu._STATE, "error", "disabled for the test")
    w = torch.randn(4, 64)
    assert not rtn_cpu.quantize_weight_into(w, SCHEMES["w8a8"], _buffers(w, SCHEMES["w8a8"]))
