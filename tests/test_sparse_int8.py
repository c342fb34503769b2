"""The sparse int8 GEMV (Top-K, then W8A8) and the deployed LaRoSA + W8A8 module vs their references.

No timing assertions (speed lives in ``mmcompress bench``).  Without a C++ compiler the kernel tests
skip; with one the kernel must build.
"""

import copy
import shutil

import pytest
import torch

from mmcompress.quant.quantizer import fake_quantize_activation, quantize_weight
from mmcompress.sparse.kernels import cpu as cpu_backend
from mmcompress.sparse.kernels import (
    pack_int8_weight,
    sparse_int8_linear,
    sparse_int8_reference,
    topk_select,
    unpack_int8_weight,
)


@pytest.fixture(scope="module")
def cpu_kernel():
    ok = cpu_backend.load()
    if not ok:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"a C++ compiler is present but the sparse kernel did not build: {cpu_backend.error()}")
        pytest.skip(f"no C++ compiler: {cpu_backend.error()}")
    return cpu_backend.ops()


def _weights(din, dout, seed=0, sym=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dout, din, generator=g) * 0.05
    codes, scale, zero = quantize_weight(w, 8, 0, sym)
    wq, zc = pack_int8_weight(codes, zero, 8, sym)
    return w, codes, scale.reshape(-1), zero, wq, zc


# (in, out, batch, keep): K = width, K = 1, batch > 1, odd widths (row groups of 4 and 64-column chunks with tails)
CASES = [(384, 200, 1, 384), (384, 200, 1, 1), (1000, 129, 4, 600), (257, 333, 3, 101), (64, 4096, 8, 64),
         (130, 64, 2, 3), (11, 7, 5, 5)]


@pytest.mark.parametrize("din,dout,batch,k", CASES)
@pytest.mark.parametrize("sym", [True, False])
def test_int8_kernel_exact_against_reference(cpu_kernel, din, dout, batch, k, sym):
    _, codes, scale, zero, wq, zc = _weights(din, dout, seed=din + k, sym=sym)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, din, generator=g)
    bias = torch.randn(dout, generator=g)
    ref, acc = sparse_int8_reference(x, wq, scale, zc, k, bias, return_acc=True)
    got = sparse_int8_linear(x, wq, scale, zc, k, bias, backend="cpu")
    # the int32 accumulation is exact and the fp32 epilogue is the same expression: equal to 1 ulp (FMA)
    torch.testing.assert_close(got, ref, rtol=2e-7, atol=1e-6)
    # the accumulator really is the integer sum over the kept channels of qa * (code - zero)
    idx, vals = topk_select(x, k, backend="cpu")
    qmax = 127
    sa = (vals.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-10)
    qa = torch.clamp(torch.round(vals / sa), -qmax, qmax).long()
    cz = codes.long().t() - (zc.long() - 128)
    expect = torch.stack([qa[b] @ cz[idx[b]] for b in range(batch)])
    assert torch.equal(acc, expect)


def test_int8_kernel_selection_ties_bf16_smoothing_and_indexed(cpu_kernel):
    din, dout = 300, 96
    _, codes, scale, zero, wq, zc = _weights(din, dout, seed=3)
    x = torch.randn(4, din).bfloat16()
    x[:, :50] = 0.5  # ties at the K-th magnitude: the lowest indices are kept, in kernel and reference
    smooth = torch.rand(din) + 0.5
    for k in (30, 60, 200):
        ref = sparse_int8_reference(x, wq, scale, zc, k, smooth=smooth)
        got = sparse_int8_linear(x, wq, scale, zc, k, smooth=smooth, backend="cpu")
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref.float(), rtol=8e-3, atol=1e-5)  # bf16 output rounding
        idx, vals = topk_select(x, k, backend="cpu")
        got_i = sparse_int8_linear(x, wq, scale, zc, bias=None, smooth=smooth, indices=idx, values=vals,
                                   backend="cpu")
        assert torch.equal(got_i, got)
    # 6-bit activations (W8A6 grid)
    xf = torch.randn(2, din)
    torch.testing.assert_close(sparse_int8_linear(xf, wq, scale, zc, 100, abits=6, backend="cpu"),
                               sparse_int8_reference(xf, wq, scale, zc, 100, abits=6), rtol=2e-7, atol=1e-6)


def test_int8_reference_is_the_fake_quant_forward():
    """The oracle itself: Q_a(S_k(x)) · Ŵᵀ as QuantLinear computes it, to fp32 round-off."""
    din, dout, k = 200, 50, 120
    w, codes, scale, zero, wq, zc = _weights(din, dout, seed=5)
    x = torch.randn(3, din)
    idx, vals = topk_select(x, k, backend="torch")
    xs = torch.zeros_like(x).scatter(-1, idx, vals)
    fq = fake_quantize_activation(xs, 8) @ (codes.float() * scale[:, None]).t()
    got = sparse_int8_reference(x, wq, scale, zc, indices=idx, values=vals)
    torch.testing.assert_close(got, fq, rtol=1e-5, atol=1e-5)
    assert torch.equal(unpack_int8_weight(wq), codes)


def test_int8_kernel_errors(cpu_kernel):
    _, codes, scale, zero, wq, zc = _weights(64, 32)
    with pytest.raises(ValueError):
        sparse_int8_linear(torch.randn(1, 63), wq, scale, zc, 10, backend="cpu")
    with pytest.raises(RuntimeError, match="uint8"):
        cpu_kernel.topk_int8_gemv(torch.randn(1, 64), wq.to(torch.int8), scale, zc, 10, None, None, 8)
    with pytest.raises(RuntimeError, match="ascending"):
        idx = torch.tensor([[3, 1]])
        cpu_kernel.indexed_int8_gemv(idx, torch.ones(1, 2), wq, scale, zc, None, None, 8, torch.float32)
    # more than 8 tokens: the PyTorch path, same numbers
    x = torch.randn(10, 64)
    torch.testing.assert_close(sparse_int8_linear(x, wq, scale, zc, 20, backend="cpu"),
                               sparse_int8_reference(x, wq, scale, zc, 20))
