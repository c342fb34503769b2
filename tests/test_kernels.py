"""Sparse decode kernels: the C++ CPU kernel and SparseLinear backends vs the PyTorch reference.

No timing assertions here (speed lives in ``benchmarks/kernel_bench.py`` and ``benchmarks/stack_decode.py``).
The C++ extension is built once per session (module fixture); without a C++ compiler the kernel tests
skip, with one they must build.
"""

import copy
import math
import shutil
import warnings

import pytest
import torch
from torch import nn

from mmcompress.sparse.kernels import cpu as cpu_backend
from mmcompress.sparse.kernels import resolve_backend, sparse_linear, sparsify_reference, topk_select
from mmcompress.sparse.decode import disable_sparse_decode, enable_sparse_decode, set_sparse_backend
from mmcompress.sparse.linear import SparseLinear
from mmcompress.sparse.topk import keep_count, topk_sparsify


@pytest.fixture(scope="module")
def cpu_kernel():
    ok = cpu_backend.load()
    if not ok:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"a C++ compiler is present but the sparse kernel did not build: {cpu_backend.error()}")
        pytest.skip(f"no C++ compiler: {cpu_backend.error()}")
    return cpu_backend.ops()


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


SHAPES = [(384, 200), (1000, 129), (64, 4096)]  # (in, out): odd sizes exercise the row and column tails


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_cpu_kernel_matches_reference(cpu_kernel, dtype, batch, sparsity):
    g = torch.Generator().manual_seed(int(sparsity * 100) + batch)
    for din, dout in SHAPES:
        x = torch.randn(batch, din, generator=g).to(dtype)
        wt = torch.randn(din, dout, generator=g).to(dtype)
        bias = torch.randn(dout, generator=g).to(dtype)
        k = keep_count(din, sparsity)
        y = sparse_linear(x, wt, k, bias, backend="cpu")
        assert y.shape == (batch, dout) and y.dtype == dtype
        # reference on the kernel's own selection (bf16 magnitudes tie; any tied choice is a valid Top-K)
        idx, vals = topk_select(x, k, backend="cpu")
        ref = sparse_linear(x.double(), wt.double(), bias=bias.double(), indices=idx, values=vals.double(),
                            backend="torch")
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        assert _rel(y, ref) < tol, (din, dout)
        if dtype == torch.float32:  # no ties in fp32 randn: the oracle's own Top-K must agree too
            oracle = torch.nn.functional.linear(topk_sparsify(x.double(), k), wt.double().t(), bias.double())
            assert _rel(y, oracle) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_select_is_a_valid_topk(cpu_kernel, dtype):
    g = torch.Generator().manual_seed(1)
    for d, k in [(11008, 6605), (4096, 1), (4096, 4095), (100, 100), (333, 17)]:
        x = torch.randn(3, d, generator=g).to(dtype)
        idx, vals = topk_select(x, k, backend="cpu")
        assert idx.shape == (3, k) and vals.dtype == torch.float32
        assert torch.all(idx[:, 1:] > idx[:, :-1])  # ascending, no duplicates
        assert torch.equal(vals, x.float().gather(1, idx))
        if k < d:
            mask = torch.zeros_like(x, dtype=torch.bool).scatter(1, idx, True)
            a = x.float().abs()
            kept_min = torch.where(mask, a, torch.inf).min(1).values
            drop_max = torch.where(mask, -torch.inf, a).max(1).values
            assert torch.all(kept_min >= drop_max)


def test_topk_select_ties_and_zeros(cpu_kernel):
    x = torch.tensor([[0.0, 1.0, -1.0, 1.0, 0.5, -1.0, 0.0, 2.0]])
    idx, vals = topk_select(x, 3, backend="cpu")
    assert idx.tolist() == [[1, 2, 7]]  # ties at |x| = 1 keep the lowest indices
    idx, _ = topk_select(torch.zeros(1, 10), 4, backend="cpu")
    assert idx.tolist() == [[0, 1, 2, 3]]


def test_indexed_and_threshold_paths(cpu_kernel):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 300, generator=g)
    wt = torch.randn(300, 77, generator=g)
    idx = torch.tensor([[5, 3, 299, 0, 3], [7, 8, 9, 10, 11]])  # unsorted, duplicate 3 (values add)
    vals = torch.randn(2, 5, generator=g)
    y = sparse_linear(x, wt, backend="cpu", indices=idx, values=vals)
    ref = sparse_linear(x, wt, backend="torch", indices=idx, values=vals)
    assert _rel(y, ref) < 1e-5
    y = sparse_linear(x, wt, backend="cpu", threshold=0.8)
    ref = (x * (x.abs() >= 0.8)) @ wt
    assert _rel(y, ref) < 1e-5
    with pytest.raises(RuntimeError, match="out of range"):
        sparse_linear(x, wt, backend="cpu", indices=torch.tensor([[0, 300]] * 2), values=torch.ones(2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_threshold_rule_of_prefill_is_the_kernels(cpu_kernel, dtype):
    """A multi-token call (prefill: ``topk.select``) and the CPU kernel (decode) keep the same channels of a
    vector: ``not |x| < t`` in float32, ``t`` rounded to float32.  The values at stake are the ones that
    round to ``t`` in a half-precision dtype without equalling it (the Python rule used to compare in
    ``x``'s dtype, with ``t`` rounded there, and kept them); NaN is kept by both."""
    from mmcompress.sparse.topk import Threshold, select, threshold_keep

    t = 0.7  # not representable in bf16/fp16: dtype(t) is on one side of t
    near = torch.tensor([t], dtype=dtype)
    ints = torch.int32 if dtype == torch.float32 else torch.int16
    nxt = (near.view(ints) + 1).view(dtype)  # the next value of the dtype above dtype(t)
    vals = torch.tensor([t, -t, 0.69, 0.71, 0.0, 5.0, -5.0, 1e-3], dtype=dtype)  # finite: inf·0 is NaN
    x = torch.cat([vals, near, -near, nxt, -nxt]).reshape(1, -1)
    d = x.shape[-1]
    wt = torch.eye(d, dtype=dtype)  # the kernel's output is then x with the dropped channels zeroed
    kept_kernel = sparse_linear(x, wt, backend="cpu", threshold=t) != 0
    keep = threshold_keep(x, t)
    assert torch.equal(keep, kept_kernel)  # (no kept value is 0)
    assert torch.equal(select(x, Threshold(t)), torch.where(keep, x, torch.zeros((), dtype=dtype)))
    at_t = float(near) >= float(torch.tensor(t))  # dtype(t) >= float32(t): bf16 no, fp16 and fp32 yes
    assert keep.tolist()[0] == [at_t] * 2 + [False, True, False, True, True, False] + [at_t] * 2 + [True] * 2
    inf = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    assert threshold_keep(inf, t).all()


@pytest.mark.parametrize("din,dout", [(1000, 129), (64, 4096), (37, 200)])
def test_bf16_weights_at_batch1_fp32_sums_of_exact_products(cpu_kernel, din, dout):
    """A bf16 weight at batch 1 with bf16-valued inputs goes through the pair-of-rows VDPBF16PS groups where
    the CPU has them (``gemv_group_dot``), other inputs through the fp32-widening groups: either way the sum
    of the exact products in fp32, so an fp32 output agrees with float64 to fp32 round-off.  Were the
    pair path used for inputs that are not bf16 values, their truncation would leave ~1e-3 (tested: fp32
    values that are not bf16 values, 1e-5)."""
    g = torch.Generator().manual_seed(din + dout)
    wt = torch.randn(din, dout, generator=g).bfloat16()
    idx = torch.arange(0, din, 1).unsqueeze(0)  # every row: groups of 8, then 4, then single rows
    for vals in (torch.randn(1, din, generator=g).bfloat16().float(), torch.randn(1, din, generator=g)):
        y = cpu_kernel.indexed_gemv(idx, vals, wt, None, torch.float32)
        ref = vals.double() @ wt.double()
        assert y.dtype == torch.float32
        assert _rel(y, ref) < 1e-5, (din, dout)


def test_the_prefetch_choice_does_not_change_results(cpu_kernel, tmp_path):
    """``MMCOMPRESS_KERNEL_PREFETCH`` (rows | ahead | none) changes only the kernels' prefetch hints, never a value:
    the same float and int8 GEMVs in fresh processes, one per setting, give identical bytes (bf16 rows of 1100
    columns and int8 rows of 11008: ``ahead`` prefetches within them and, over their last 1 KB, into the next
    group's or pass's rows)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from mmcompress.sparse.kernels import cpu\n"
        "assert cpu.load(), cpu.error()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "out = []\n"
        "for dt, n in ((torch.bfloat16, 300), (torch.bfloat16, 1100), (torch.float32, 300)):\n"
        "    x = torch.randn(3, 700, generator=g).to(dt)\n"
        "    wt = torch.randn(700, n, generator=g).to(dt)\n"
        "    out += [cpu.ops().topk_gemv(x[:1], wt, 420, None).float(), cpu.ops().topk_gemv(x, wt, 420, None).float()]\n"
        "from mmcompress.sparse.kernels import pack_int8_weight\n"
        "codes = torch.randint(-127, 128, (11008, 700), generator=g, dtype=torch.int8)\n"
        "wq, zc = pack_int8_weight(codes)\n"
        "scale = torch.rand(11008, generator=g) + 0.5\n"
        "for b in (1, 3):\n"
        "    out.append(cpu.ops().topk_int8_gemv(torch.randn(b, 700, generator=g), wq, scale, zc, 420, None, None, 8))\n"
        "torch.save(out, sys.argv[1])\n")
    res = {}
    for mode in ("rows", "ahead", "none"):
        env = {**os.environ, "MMCOMPRESS_KERNEL_PREFETCH": mode}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / mode)], check=True, env=env)
        res[mode] = torch.load(tmp_path / mode)
    for other in ("ahead", "none"):
        for a, b in zip(res["rows"], res[other]):
            assert torch.equal(a, b)


def test_an_unknown_prefetch_setting_gets_one_line(monkeypatch):
    """A value other than rows / ahead / none is ignored by the kernels; the loader says so (the check it runs)."""
    from mmcompress.sparse.kernels import cpu

    for ok in (None, "rows", "ahead", "none"):
        if ok is None:
            monkeypatch.delenv("MMCOMPRESS_KERNEL_PREFETCH", raising=False)
        else:
            monkeypatch.setenv("MMCOMPRESS_KERNEL_PREFETCH", ok)
        assert cpu.prefetch_setting_notice() is None
    monkeypatch.setenv("MMCOMPRESS_KERNEL_PREFETCH", "Rows")
    notice = cpu.prefetch_setting_notice()
    assert notice.startswith("mmcompress: MMCOMPRESS_KERNEL_PREFETCH='Rows' ignored") and "\n" not in notice


def test_leading_dims_batch8_and_prefill_fallback(cpu_kernel):
    g = torch.Generator().manual_seed(3)
    wt = torch.randn(256, 96, generator=g)
    for shape in [(256,), (1, 1, 256), (8, 1, 256), (2, 4, 256), (3, 5, 256)]:  # 15 tokens -> PyTorch path
        x = torch.randn(*shape, generator=g)
        y = sparse_linear(x, wt, 100, backend="cpu")
        assert y.shape == (*shape[:-1], 96)
        ref = topk_sparsify(x, 100) @ wt
        assert _rel(y, ref) < 1e-5


def test_shape_errors():
    with pytest.raises(ValueError, match="channels"):
        sparse_linear(torch.randn(1, 10), torch.randn(11, 4), 5, backend="torch")
    with pytest.raises(ValueError, match="unknown sparse backend"):
        resolve_backend("cuda-magic", "cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("triton", "cpu")


def test_fallback_without_compiler(monkeypatch):
    monkeypatch.setitem(cpu_backend._STATE, "loaded", False)
    monkeypatch.setitem(cpu_backend._STATE, "error", "no compiler (test)")
    monkeypatch.setitem(cpu_backend._STATE, "warned", False)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert resolve_backend("cpu", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"
    x, wt = torch.randn(1, 50), torch.randn(50, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        y = sparse_linear(x, wt, 20, backend="cpu")
    assert _rel(y, topk_sparsify(x, 20) @ wt) < 1e-6


# -- SparseLinear ------------------------------------------------------------------------------------


def _module(din=320, dout=144, keep=100, dtype=torch.float32, bias=True, seed=0, **kw):
    lin = nn.Linear(din, dout, bias=bias, dtype=dtype)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        lin.weight.copy_(torch.randn(dout, din, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(dout, generator=g))
    return lin, SparseLinear.from_linear(lin, keep, **kw)


@pytest.mark.parametrize("mode", ["topk", "threshold", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_backends_agree(cpu_kernel, mode, dtype):
    lin, ref = _module(dtype=dtype, mode=mode, threshold=0.7)
    _, fast = _module(dtype=dtype, mode=mode, threshold=0.7)
    fast.set_backend("cpu")
    assert fast.kernel_layout and fast.weight.shape == (144, 320) and torch.equal(fast.weight, ref.weight)
    g = torch.Generator().manual_seed(4)
    for shape in [(1, 1, 320), (4, 1, 320), (320,), (1, 6, 320), (2, 9, 320)]:
        x = torch.randn(*shape, generator=g).to(torch.float32)  # fp32 randn: no magnitude ties
        x = x.to(dtype)
        if dtype == torch.bfloat16:  # make magnitudes distinct in bf16 so both Top-Ks agree
            x = (torch.randperm(320, generator=g).float() / 64 + 0.01).to(dtype) * torch.sign(x)
        ya, yb = ref(x), fast(x)
        assert ya.shape == yb.shape == (*shape[:-1], 144)
        assert _rel(yb, ya) < (1e-5 if dtype == torch.float32 else 1.5e-2), shape


def test_sparse_linear_layout_state_dict_and_spec(cpu_kernel):
    lin, m = _module()
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    m.set_backend("cpu")
    assert m.weight_t.is_contiguous() and m.weight_t.shape == (320, 144)
    sd = m.state_dict()
    assert set(sd) == set(sd0) and sd["weight"].shape == (144, 320) and torch.equal(sd["weight"], sd0["weight"])
    # load into a kernel-layout module: values land in WT, layout kept
    _, other = _module(seed=5)
    other.set_backend("cpu")
    other.load_state_dict(sd0)
    assert other.kernel_layout and torch.equal(other.weight, lin.weight)
    spec = m.spec()
    assert "backend" not in spec and SparseLinear.from_spec(spec).spec() == spec
    m.set_backend("torch")
    assert m.weight.is_contiguous() and torch.equal(m.weight, lin.weight)
    assert SparseLinear(8, 4, False, 3, backend="cpu").kernel_layout  # constructor keyword


def test_sparse_linear_backend_attribute_without_set_backend(cpu_kernel):
    lin, m = _module()
    m.backend = "cpu"  # relayout happens lazily on the first kernel call
    x = torch.randn(1, 1, 320)
    assert _rel(m(x), topk_sparsify(x, 100) @ lin.weight.t() + lin.bias) < 1e-5
    assert m.kernel_layout


def test_shared_selection_cache_is_safe(cpu_kernel):
    _, q = _module(seed=1)
    _, k = _module(seed=2)
    for mod in (q, k):
        mod.set_backend("cpu")
    x = torch.randn(1, 1, 320)
    ya, yb = q(x), k(x)  # the second call reuses the selection of the same tensor
    assert _rel(yb, topk_sparsify(x, 100) @ k.weight.t() + k.bias) < 1e-5
    x.mul_(-1.0).add_(torch.randn(1, 1, 320))  # in-place change: must be re-selected
    assert _rel(k(x), topk_sparsify(x, 100) @ k.weight.t() + k.bias) < 1e-5
    k.keep = 7  # another K: re-selected
    assert _rel(k(x), topk_sparsify(x, 7) @ k.weight.t() + k.bias) < 1e-5
    del ya, yb


class _Block(nn.Module):
    """Two SparseLinear readers sharing an input, a SparseLinear writer and a dense adapter."""

    def __init__(self, d=192, f=320):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        mk = lambda i, o, keep: SparseLinear.from_linear(_init(nn.Linear(i, o, bias=False), g), keep)  # noqa: E731
        self.gate, self.up, self.down = mk(d, f, 96), mk(d, f, 96), mk(f, d, 160)
        self.adapter = _init(nn.Linear(d, d, bias=False), g)

    def forward(self, h):
        return self.adapter(h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h)))


def _init(lin, g):
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)
    return lin


def test_enable_sparse_decode(cpu_kernel):
    block = _Block()
    dec = torch.randn(1, 1, 192)
    pre = torch.randn(1, 12, 192)
    ref_dec = block(dec)
    ref_pre_sparse = block(pre)  # sparse_prefill=True (default): every prompt token sparsified
    for m in (block.gate, block.up, block.down):
        m.sparse_prefill = False
    ref_pre_dense = block(pre)
    assert _rel(ref_pre_dense, ref_pre_sparse) > 1e-3  # the two prefill policies really differ
    for m in (block.gate, block.up, block.down):
        m.sparse_prefill = True
    assert enable_sparse_decode(block, "cpu") == 3
    assert all(m.backend == "cpu" and m.kernel_layout and not m.sparse_prefill
               for m in (block.gate, block.up, block.down))
    assert block.adapter.weight.is_contiguous()  # the dense adapter is untouched
    assert _rel(block(dec), ref_dec) < 1e-5
    assert _rel(block(pre), ref_pre_dense) < 1e-5
    assert set_sparse_backend(block, "cpu", sparse_prefill=True) == 3
    assert _rel(block(pre), ref_pre_sparse) < 1e-5
    assert _rel(block(dec), ref_dec) < 1e-5
    assert disable_sparse_decode(block) == 3 and block.gate.weight.is_contiguous()
    assert _rel(block(dec), ref_dec) < 1e-5


# -- Triton (needs CUDA) ------------------------------------------------------------------------------


# The same kernels run on CPU tensors under Triton's interpreter in test_triton_interpret.py (no GPU).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_triton_matches_reference(dtype, batch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("triton")
    from mmcompress.sparse.kernels import triton_gemv

    g = torch.Generator(device="cuda").manual_seed(0)
    for din, dout in [(4096, 4096), (1000, 129), (11008, 4096)]:
        x = torch.randn(batch, din, device="cuda", generator=g).to(dtype)
        wt = (torch.randn(din, dout, device="cuda", generator=g) / din ** 0.5).to(dtype)
        bias = torch.randn(dout, device="cuda", generator=g).to(dtype)
        for s in (0.0, 0.5, 0.9):
            k = keep_count(din, s)
            xs = sparsify_reference(x, k)
            y = triton_gemv.sparse_gemv(xs, wt, config=(16, 256, 4))  # pre-sparsified input, legacy config
            assert _rel(y, xs.double() @ wt.double()) < 1e-2
            # threshold kernel: exactly torch.topk's K-th magnitude
            a = x.float().abs()
            thr = triton_gemv.topk_threshold(x, k)
            assert torch.equal(thr, a.topk(k, dim=-1).values[:, -1])
            assert torch.all((a >= thr[:, None]).sum(1) >= k) and torch.all((a > thr[:, None]).sum(1) < k)
            ref = sparsify_reference(x, k).double() @ wt.double() + bias.double()  # exactly K, one tie policy
            for cfg in (("rows", 32, 32, 4), ("splitk", 16, 256, 4)):
                y = triton_gemv.topk_sparse_gemv(x, wt, k, bias, config=cfg)
                assert y.dtype == dtype and _rel(y, ref) < 1e-2, cfg
            if batch == 1:  # the per-shape tuned config through the public API (tuning compiles every candidate)
                y2 = sparse_linear(x, wt, k, bias, backend="triton")
                assert _rel(y2, ref) < 1e-2
        xf = torch.randn(batch, din, device="cuda", generator=g)  # fp32: no ties, exactly K
        k = keep_count(din, 0.4)
        thr = triton_gemv.topk_threshold(xf, k)
        assert torch.all((xf.abs() >= thr[:, None]).sum(1) == k)


@pytest.mark.gpu
def test_triton_threshold_mode_and_sparse_linear_module():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 1, 4096, device="cuda", generator=g).to(torch.bfloat16)
    wt = (torch.randn(4096, 512, device="cuda", generator=g) / 64).to(torch.bfloat16)
    y = sparse_linear(x, wt, backend="triton", threshold=0.7)
    ref = torch.where(x.double().abs() >= 0.7, x.double(), 0.0) @ wt.double()
    assert _rel(y, ref) < 1e-2
    lin = nn.Linear(4096, 512, device="cuda", dtype=torch.bfloat16)
    m = SparseLinear.from_linear(lin, 1638, backend="triton")
    ref = torch.nn.functional.linear(sparsify_reference(x, 1638).double(), lin.weight.double(), lin.bias.double())
    assert _rel(m(x), ref) < 1e-2


def _sparsified_tiny_llama(tokenizer, selector):
    from .tiny_models import tiny_model

    model, _ = tiny_model("llama", tokenizer=tokenizer)
    dense = copy.deepcopy(model)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                lin = getattr(parent, name)
                setattr(parent, name, SparseLinear.from_linear(lin, selector(lin)))
    return model, dense


def test_model_decode_speedup_runs_the_product_engine_against_the_fastest_dense_path(cpu_kernel, tokenizer):
    """The demo's decode figure (``bench_decode.model_decode_speedup``): the sparsified model as
    ``mmcompress.load`` runs it, on the decode engine (the fused step where it can), interleaved with the
    dense variants of the original model; the fastest of those is the baseline."""
    from mmcompress.runtime import fused
    from mmcompress.runtime.bench_decode import dense_variants, model_decode_speedup

    model, dense = _sparsified_tiny_llama(tokenizer, lambda lin: keep_count(lin.in_features, 0.5))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    baselines = dense_variants(dense)
    assert set(baselines) == {"engine_fp32", "engine_bf16", "engine_own_kernel_0pct"}
    res = model_decode_speedup(model, ids, tokens=3, rounds=1, baselines=baselines)
    assert res["variants_tok_s"].keys() == {"compressed", *baselines}
    tok_s = res["variants_tok_s"]
    assert res["dense_baseline"] == max(baselines, key=tok_s.get)  # the fastest dense path, never a slower one
    assert res["dense_tok_s"] == tok_s[res["dense_baseline"]] and res["tok_s"] == tok_s["compressed"]
    assert math.isclose(res["speedup"], res["tok_s"] / res["dense_tok_s"], rel_tol=0.01)
    if fused.load():
        assert res["decode_path"] == "fused" and res["fused_problem"] is None
    else:
        assert res["decode_path"] == "python" and res["fused_problem"]
    # left as mmcompress.load runs a sparse artifact: kernel layout, dense prefill
    assert all(m.backend == "cpu" and m.mode == "topk" and m.kernel_layout and not m.sparse_prefill
               for m in model.modules() if isinstance(m, SparseLinear))
    # decode steps on the kernel give the same logits as the reference path
    for m in model.modules():
        if isinstance(m, SparseLinear):
            m.sparse_prefill = True
    with torch.no_grad():
        last = model(input_ids=ids[:, -1:]).logits  # one token: the C++ kernel
    disable_sparse_decode(model)  # the PyTorch reference path
    with torch.no_grad():
        assert _rel(model(input_ids=ids[:, -1:]).logits, last) < 1e-4


def test_model_decode_speedup_says_when_the_sparse_model_is_not_on_the_fused_step(cpu_kernel, tokenizer):
    """TEAL's threshold sparsifier runs on the fused step (since session 35); CATS's thresholded activation
    has none: the row says so (Python step, and why)."""
    from mmcompress.runtime import fused
    from mmcompress.runtime.bench_decode import dense_variants, model_decode_speedup
    from mmcompress.sparse.merge import ThresholdedActivation
    from mmcompress.sparse.topk import Threshold

    if not fused.load():
        pytest.skip("no fused decode step on this CPU")
    model, dense = _sparsified_tiny_llama(tokenizer, lambda lin: Threshold(0.05))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    baselines = dense_variants(dense)
    res = model_decode_speedup(model, ids, tokens=3, rounds=1, baselines=baselines)
    assert res["decode_path"] == "fused" and res["fused_problem"] is None
    mlp = model.model.layers[1].mlp
    mlp.act_fn = ThresholdedActivation(mlp.act_fn, 0.01)
    res = model_decode_speedup(model, ids, tokens=3, rounds=1, baselines=baselines)
    assert res["decode_path"] == "python" and "thresholded activation" in res["fused_problem"]
    assert res["variants_step"]["compressed"] == "python"
    assert res["variants_step"][res["dense_baseline"]] == "fused"


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_one(cpu_kernel):
    """torch's build ``lock`` file outlives a process killed mid-build; the next process must not wait on
    it forever (it did: every later run hung in ``FileBaton.wait``)."""
    import os
    import subprocess
    import sys

    lock = cpu_backend.build_dir() / "lock"
    lock.touch()  # what a Ctrl-C during the first build leaves
    try:
        code = "from mmcompress.sparse.kernels import cpu; assert cpu.load(), cpu.error()"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_cpu_kernels_use_no_non_temporal_prefetch():
    """Our C++ kernels stream weight rows that a software prefetch fetched one row group ahead (more than
    L1 holds).  A non-temporal prefetch (PREFETCHNTA: ``__builtin_prefetch(p, rw, 0)``, ``_MM_HINT_NTA``)
    made the bf16 sparse GEMV 2.2x slower than no prefetch at all on an Intel Xeon (docs/runtime.md, "Why
    sitting D was slow"), which a correctness test cannot see; the hint must reach L2 (T0/T1/T2)."""
    import re
    from pathlib import Path

    import mmcompress

    root = Path(mmcompress.__file__).parent
    sources = sorted([*root.rglob("*.cpp"), *root.rglob("*.h")])
    assert any(p.name == "sparse_gemv.cpp" for p in sources), "the kernel sources were not found"
    nta = re.compile(r"__builtin_prefetch\s*\([^;]*?,\s*\d\s*,\s*0\s*\)|_MM_HINT_NTA|prefetchnta", re.IGNORECASE)
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in sources
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if nta.search(line.split("//")[0])]
    assert not hits, "non-temporal prefetch in a CPU kernel:\n" + "\n".join(hits)


def test_demo_decodes_bf16_copies_together_and_keeps_the_evaluated_model(cpu_kernel, tokenizer):
    """The demo's decode rows: the sparse models in bf16, the dtype they are served in (the demo converts each
    after its fp32 evaluation; here bf16 copies, so that the fp32 originals can be checked untouched), decoded
    in one interleaved run with the original's dense variants (``models_decode_speedup``: one set of baseline
    runs for both); the baseline is the fastest."""
    import copy

    from mmcompress_testbed.demo import _decode_speeds

    model, dense = _sparsified_tiny_llama(tokenizer, lambda lin: keep_count(lin.in_features, 0.5))
    other, _ = _sparsified_tiny_llama(tokenizer, lambda lin: keep_count(lin.in_features, 0.25))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    served = {"half": copy.deepcopy(model).to(torch.bfloat16), "quarter": copy.deepcopy(other).to(torch.bfloat16)}
    speeds = _decode_speeds(served, dense, {"tokens": 3})
    assert set(speeds) == {"half", "quarter"}
    for name, speed in speeds.items():
        tok_s = speed["variants_tok_s"]
        assert set(tok_s) == {"compressed", "half", "quarter", "engine_fp32", "engine_bf16",
                              "engine_own_kernel_0pct"} - {name}
        baselines = {k: v for k, v in tok_s.items() if k.startswith("engine_")}
        assert speed["dense_baseline"] == max(baselines, key=baselines.get)
        assert speed["dtype"] == "bfloat16" and speed["speedup"] == pytest.approx(  # each rounded to 3 places
            tok_s["compressed"] / baselines[speed["dense_baseline"]], rel=1e-2, abs=2e-3)
    assert speeds["half"]["dense_tok_s"] == speeds["quarter"]["dense_tok_s"]  # one set of baseline runs
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_extension_build_dirs_are_per_source_path(tmp_path):
    """Two copies of the same source (two installs, two checkouts) get their own build directories: torch's
    build.ninja records the source path, so a shared one was rebuilt by each in turn."""
    a, b = tmp_path / "a" / "k.cpp", tmp_path / "b" / "k.cpp"
    for f in (a, b):
        f.parent.mkdir()
        f.write_text("int f() { return 1; }\n")
    assert cpu_backend.extension_name("x", a) == cpu_backend.extension_name("x", a)
    assert cpu_backend.extension_name("x", a) != cpu_backend.extension_name("x", b)
    before = cpu_backend.extension_name("x", b)
    b.write_text("int f() { return 2; }\n")  # and a changed source still changes the name
    assert cpu_backend.extension_name("x", b) != before
