"""The Triton kernels (Top-K threshold, masked GEMV) on CPU tensors under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` is imported: Triton's own ``@jit`` helpers
(``tl.sum``, ``tl.max``, ...) are decorated at its import, and a compiled helper cannot be called from an
interpreted kernel ("Cannot call @triton.jit'd outside of the scope of a kernel").  Other test modules
import triton indirectly at collection (``compressed_tensors`` does), so ``conftest.py`` sets it first
when there is no CUDA; this module sets it too (when run alone) and skips (does not fail) when ``triton``
is missing (CI), when it was nevertheless imported compiled, or when CUDA is present (there the
``gpu``-marked tests in ``test_kernels.py`` exercise the real kernels, and an interpreted Triton would
break them).
Our kernels are decorated at import of ``triton_gemv``; the fixture re-imports it if it was imported
with compiled kernels.  Real-GPU compilation is checked separately, without a GPU, by
``benchmarks/triton_compile_check.py``.
"""

import importlib
import os
import sys

import numpy as np
import pytest
import torch

from mmcompress.sparse.topk import keep_count, topk_sparsify

if torch.cuda.is_available():
    pytest.skip("CUDA present: the gpu-marked tests run the real kernels", allow_module_level=True)
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
if type(triton.language.sum).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


@pytest.fixture(scope="module")
def tg():
    from mmcompress.sparse.kernels import triton_gemv

    if not triton_gemv.interpreted():
        importlib.reload(triton_gemv)
    assert triton_gemv.interpreted()
    # Triton < 3.9's interpreter converts a scalar to int with int(ndarray of shape (1,)), which numpy >= 2.4
    # refuses, so a runtime `range(0, K, BLOCK)` fails.  Patch that conversion (test-side only).
    from triton.runtime import interpreter as interp

    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is not None:
        def patched(tensor, scope):
            orig(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        interp._patch_lang_tensor = patched
    yield triton_gemv
    if orig is not None:
        interp._patch_lang_tensor = orig


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_threshold_is_the_kth_magnitude(tg, dtype):
    g = torch.Generator().manual_seed(0)
    for B, D in [(1, 4096), (3, 1000), (8, 129), (2, 11008)]:
        x = torch.randn(B, D, generator=g).to(dtype)
        for k in sorted({1, keep_count(D, 0.9), keep_count(D, 0.5), keep_count(D, 0.4), D - 1, D}):
            thr = tg.topk_threshold(x, k)
            assert thr.dtype == torch.float32 and thr.shape == (B,)
            a = x.float().abs()
            assert torch.equal(thr, a.topk(k, dim=-1).values[:, -1]), (B, D, k)
            kept, above = (a >= thr[:, None]).sum(1), (a > thr[:, None]).sum(1)
            assert torch.all(above < k) and torch.all(kept >= k)  # ties at thr are all kept
            if dtype == torch.float32:  # continuous data: no ties, exactly K
                assert torch.all(kept == k)


def test_topk_threshold_chunked_ties_and_zeros(tg, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1000, generator=g).to(torch.bfloat16)
    one = tg.topk_threshold(x, 300)
    monkeypatch.setattr(tg, "MAX_ONE_CHUNK", 256)  # rows longer than a block: chunked re-reads every pass
    assert torch.equal(tg.topk_threshold(x, 300), one)
    y = torch.randn(3, 5000, generator=g)  # fp32: all 31 bits searched
    assert torch.equal(tg.topk_threshold(y, 777), y.abs().topk(777).values[:, -1])
    monkeypatch.undo()
    # ties: 8 entries of magnitude 2, K = 3 -> threshold 2; the first three tied (indices 1, 2, 4) are kept
    t = torch.tensor([[0.0, 2.0, -2.0, 1.0, 2.0, -2.0, 2.0, 0.5, 2.0, -2.0, 2.0, 0.0]])
    thr, cut = tg.topk_bounds(t, 3)
    assert thr.item() == 2.0 and cut.item() == 4
    assert torch.equal(tg.topk_sparse_gemv(t, torch.eye(12), 3), topk_sparsify(t, 3))
    # more zeros than D - K: threshold 0; zeros are never read by the GEMV, the product is the Top-K one
    z = torch.zeros(1, 64)
    z[0, [3, 10]] = torch.tensor([1.5, -0.25])
    assert tg.topk_threshold(z, 5).item() == 0.0
    wt = torch.randn(64, 9, generator=g)
    assert _rel(tg.topk_sparse_gemv(z, wt, 5), z @ wt) < 1e-6
    with pytest.raises(ValueError, match="k must be"):
        tg.topk_threshold(z, 65)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_masked_gemv_every_config(tg, dtype, batch):
    g = torch.Generator().manual_seed(2 + batch)
    din, dout = 200, 77  # row and column tails for every tile size
    x = torch.randn(batch, din, generator=g).to(dtype)
    wt = (torch.randn(din, dout, generator=g) / din ** 0.5).to(dtype)
    bias = torch.randn(dout, generator=g).to(dtype)
    k = keep_count(din, 0.5)
    ref = topk_sparsify(x, k).double() @ wt.double() + bias.double()  # exactly k, the CPU tie policy
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    cfgs = tg.candidate_configs(batch)
    assert {c[0] for c in cfgs} == {"rows", "splitk"}
    for cfg in cfgs:
        y = tg.topk_sparse_gemv(x, wt, k, bias, config=cfg)
        assert y.dtype == dtype and y.shape == (batch, dout)
        assert _rel(y, ref) < tol, cfg
    if dtype == torch.float32:  # no ties: the kernel's product is the exact Top-K product
        oracle = topk_sparsify(x.double(), k) @ wt.double() + bias.double()
        assert _rel(tg.topk_sparse_gemv(x, wt, k, bias), oracle) < 1e-5


def test_gemv_threshold_presparsified_dense_and_legacy_config(tg):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 1000, generator=g).to(torch.float16)
    wt = (torch.randn(1000, 129, generator=g) / 30).to(torch.float16)
    bias = torch.randn(129, generator=g).to(torch.float16)
    xd = x.double()
    for cfg in (None, ("rows", 16, 64, 4), (16, 256, 4)):  # a 3-tuple is the legacy split-K config
        # scalar threshold (TEAL)
        y = tg.sparse_gemv(x, wt, bias, config=cfg, thr=0.7)
        ref = torch.where(xd.abs() >= 0.7, xd, 0.0) @ wt.double() + bias.double()
        assert y.dtype == torch.float16 and _rel(y, ref) < 1e-2, cfg
    # pre-sparsified input, no threshold: zeros skipped
    xs = topk_sparsify(x, 100)
    assert _rel(tg.sparse_gemv(xs, wt), xs.double() @ wt.double()) < 1e-2
    # dense (k >= in) and k <= 0
    assert _rel(tg.topk_sparse_gemv(x, wt, 1000, bias), xd @ wt.double() + bias.double()) < 1e-2
    assert torch.equal(tg.topk_sparse_gemv(x, wt, 0, bias), bias.expand(8, 129))
    with pytest.raises(ValueError, match="1..8 tokens"):
        tg.sparse_gemv(torch.randn(9, 1000).half(), wt)


def test_sparse_linear_triton_path(tg):
    from mmcompress.sparse import kernels

    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 256, generator=g)
    wt = torch.randn(256, 40, generator=g)
    bias = torch.randn(40, generator=g)
    ref = topk_sparsify(x, 64) @ wt + bias
    assert _rel(kernels._triton_linear(x, wt, 64, bias, None, None, None), ref) < 1e-5
    assert _rel(kernels._triton_linear(x, wt, None, None, 0.8, None, None), (x * (x.abs() >= 0.8)) @ wt) < 1e-5
    idx = torch.tensor([[5, 3, 255], [0, 1, 2], [7, 7, 9]])
    vals = torch.randn(3, 3, generator=g)
    ref = kernels.sparse_linear(x, wt, backend="torch", indices=idx, values=vals)
    assert _rel(kernels._triton_linear(x, wt, None, None, None, idx, vals), ref) < 1e-5
    assert _rel(kernels._triton_linear(x, wt, None, None, None, None, None), x @ wt) < 1e-5


def test_sparse_linear_module_shares_thresholds(tg, monkeypatch):
    from mmcompress.sparse import kernels
    from mmcompress.sparse.linear import SparseLinear

    monkeypatch.setattr(kernels, "resolve_backend", lambda backend, device: "triton")  # CPU tensors, interpreter
    calls = []
    real = tg.topk_bounds
    monkeypatch.setattr(tg, "topk_bounds", lambda x, k: calls.append(k) or real(x, k))
    g = torch.Generator().manual_seed(7)
    mods = []
    for _ in range(2):
        lin = torch.nn.Linear(192, 48)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(48, 192, generator=g))
        mods.append(SparseLinear.from_linear(lin, 80, backend="triton"))
    x = torch.randn(2, 1, 192, generator=g)
    for m in mods:
        y = m(x)
        assert y.shape == (2, 1, 48)
        assert _rel(y, torch.nn.functional.linear(topk_sparsify(x, 80), m.weight, m.bias)) < 1e-5
    assert calls == [80]  # one threshold kernel for both readers of x
    x.add_(1.0)  # modified in place: re-selected
    assert _rel(mods[1](x), torch.nn.functional.linear(topk_sparsify(x, 80), mods[1].weight, mods[1].bias)) < 1e-5
    assert calls == [80, 80]
    assert tg.interpreted()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_keeps_exactly_k_with_the_cpu_tie_policy(tg, monkeypatch, dtype):
    """One tie policy on every backend: on data with many ties (small integers, bf16/fp16 rounding) the Triton
    selection equals ``sparse/topk.py``'s (exactly K, ties lowest index first), in one chunk and chunked,
    in both GEMV variants; the identity weight makes the GEMV's output the kept activations themselves."""
    g = torch.Generator().manual_seed(11)
    for B, D in [(1, 96), (4, 300), (8, 1000)]:
        x = torch.randint(-6, 7, (B, D), generator=g).to(dtype)  # 13 magnitudes over D entries: ties everywhere
        x[0, :5] = 0.0
        eye = torch.eye(D, dtype=dtype)
        for k in sorted({1, 7, keep_count(D, 0.4), keep_count(D, 0.9), D - 1}):
            want = topk_sparsify(x, k)
            thr, cut = tg.topk_bounds(x, k)
            a = x.float().abs()
            kept = (a > thr[:, None]) | ((a == thr[:, None]) & (torch.arange(D) <= cut.long()[:, None]))
            assert torch.all(kept.sum(1) == k), (B, D, k)
            assert torch.equal(torch.where(kept, x, torch.zeros_like(x)), want), (B, D, k)
            for cfg in (("rows", 32, 32, 4), ("splitk", 16, 256, 4)):
                assert torch.equal(tg.topk_sparse_gemv(x, eye, k, config=cfg), want), (B, D, k, cfg)
            monkeypatch.setattr(tg, "MAX_ONE_CHUNK", 64)  # chunked search and tie scan
            t2, c2 = tg.topk_bounds(x, k)
            monkeypatch.undo()
            assert torch.equal(t2, thr) and torch.equal(c2, cut), (B, D, k)
