"""The sparse int8 GEMV (Top-K, then W8A8) and the deployed LaRoSA + W8A8 module vs their references.

No timing assertions (speed lives in ``benchmarks/kernel_bench.py`` and ``benchmarks/stack_decode.py``).
Without a C++ compiler the kernel tests skip; with one the kernel must build.
"""

import copy

import pytest
import torch

from mmcompress.quant.quantizer import fake_quantize_activation, quantize_weight
from mmcompress.sparse.kernels import (
    pack_int8_weight,
    sparse_int8_linear,
    sparse_int8_reference,
    topk_select,
    unpack_int8_weight,
)

from .test_kernels import cpu_kernel  # noqa: F401  (the module fixture: builds the extension or skips)


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
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernel.indexed_int8_gemv(torch.tensor([[3, 64]]), torch.ones(1, 2), wq, scale, zc, None, None, 8,
                                     torch.float32)
    # indices in any order give the same result as ascending ones
    idx, vals = torch.tensor([[5, 40, 2, 17]]), torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    perm = torch.tensor([2, 0, 3, 1])
    a = cpu_kernel.indexed_int8_gemv(idx, vals, wq, scale, zc, None, None, 8, torch.float32)
    b = cpu_kernel.indexed_int8_gemv(idx[:, perm], vals[:, perm], wq, scale, zc, None, None, 8, torch.float32)
    assert torch.equal(a, b)
    # more than 8 tokens: the PyTorch path, same numbers
    x = torch.randn(10, 64)
    torch.testing.assert_close(sparse_int8_linear(x, wq, scale, zc, 20, backend="cpu"),
                               sparse_int8_reference(x, wq, scale, zc, 20))


# -- the deployed joint module (LaRoSA + RTN W8A8 recipe) -----------------------------------------------


def _joint_model(tokenizer, scheme="w8a8", layers=2, **quant_opts):
    from mmcompress.data import CalibrationSet
    from mmcompress.recipe import apply_recipe, parse_recipe

    from .conftest import text_samples, tiny_model

    model, tok = tiny_model("llama", layers=layers, tokenizer=tokenizer)
    calib = CalibrationSet(text_samples(tok, n=2, seqlen=32))
    steps = parse_recipe({"steps": [{"sparsify": {"method": "larosa", "sparsity": 0.4}},
                                    {"quantize": {"method": "rtn", "scheme": scheme, **quant_opts}}]})
    apply_recipe(model, calib, steps, progress=False)
    return model.eval(), tok


def _decode_logits(model, ids, steps=4):
    """Prefill then greedy single-token steps (the kernel path), logits of every step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits)


@pytest.fixture
def stable_topk(monkeypatch):
    """The reference forward with the kernel's tie policy (ties at the K-th magnitude keep the lowest
    indices; ``torch.topk`` leaves it unspecified).  Exact ties are common in tiny GQA models: a one-token
    attention output repeats each value head, and two valid Top-K sets then differ a lot."""
    from mmcompress.sparse import topk as sl  # SparseLinear's reference path selects through topk.select
    from mmcompress.sparse.kernels import _stable_topk

    def topk_sparsify(x, k):
        if k >= x.shape[-1]:
            return x
        idx, vals = _stable_topk(x.reshape(-1, x.shape[-1]), k)
        out = torch.zeros(idx.shape[0], x.shape[-1], dtype=x.dtype).scatter(-1, idx, vals.to(x.dtype))
        return out.reshape(x.shape)

    monkeypatch.setattr(sl, "topk_sparsify", topk_sparsify)


def test_joint_deploy_matches_reference_and_saves_the_same_artifact(cpu_kernel, tokenizer, tmp_path, stable_topk):
    import mmcompress
    from mmcompress.quant.linear import QuantLinear
    from mmcompress.sparse.joint import SparseInt8Linear, deploy
    from mmcompress.sparse.decode import enable_sparse_decode
    from mmcompress.sparse.merge import ResidualAdaptedLayer

    model, tok = _joint_model(tokenizer)
    ids = torch.randint(0, len(tok) - 10, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _decode_logits(model, ids)
        ref_full = model(input_ids=ids).logits
    ref_dir = mmcompress.save(model, tmp_path / "ref")
    deployed = copy.deepcopy(model)
    n = enable_sparse_decode(deployed, "cpu", sparse_prefill=True)
    mods = [m for m in deployed.modules() if isinstance(m, SparseInt8Linear)]
    assert n >= len(mods) == 14 and not any(type(m) is QuantLinear for m in deployed.modules())
    assert all(t.numel() <= max(m.in_features, m.out_features) for m in mods
               for t in list(m.buffers()) + list(m.parameters()) if t.is_floating_point())  # no float copy of a weight: codes (uint8) and per-channel vectors only
    assert any(isinstance(m, ResidualAdaptedLayer) and m.adapter_backend == "cpu" for m in deployed.modules())
    with torch.no_grad():
        got = _decode_logits(deployed, ids)
        got_full = deployed(input_ids=ids).logits  # 12 tokens: the kernel 8 tokens at a time
    # fp32 model: integer accumulation vs the fake-quant float matmul differ by float round-off only
    # (measured ~1e-6 relative); the bound leaves room for bf16-free accumulation-order effects
    scale = ref.abs().max()
    assert (got - ref).abs().max() / scale < 1e-4
    assert (got_full - ref_full).abs().max() / ref_full.abs().max() < 1e-4
    # the deployed model saves the same artifact (manifest modules and tensors) as the reference one
    dep_dir = mmcompress.save(deployed, tmp_path / "dep")
    import json

    from safetensors.torch import load_file

    m_ref = json.loads((ref_dir / "mmcompress.json").read_text())["modules"]
    m_dep = json.loads((dep_dir / "mmcompress.json").read_text())["modules"]
    assert m_ref == m_dep
    t_ref, t_dep = load_file(ref_dir / "model.safetensors"), load_file(dep_dir / "model.safetensors")
    assert t_ref.keys() == t_dep.keys() and all(torch.equal(t_ref[k], t_dep[k]) for k in t_ref)
    # loading and deploying again gives the deployed numbers
    assert sum(isinstance(m, SparseInt8Linear) for m in mmcompress.load(dep_dir).modules()) == 14  # the default
    again = mmcompress.load(dep_dir, runtime="reference")
    assert deploy(again, "cpu") == (14, 0)
    enable_sparse_decode(again, "cpu", sparse_prefill=True)  # adapters on the GEMV kernel too
    with torch.no_grad():
        assert torch.equal(_decode_logits(again, ids), got)


def test_joint_deploy_w4a8_and_ineligible(cpu_kernel, tokenizer, stable_topk):
    from mmcompress.quant.linear import QuantLinear
    from mmcompress.sparse.joint import SparseInt8Linear, deploy

    model, tok = _joint_model(tokenizer, "w4a8", layers=1)
    ids = torch.randint(0, len(tok) - 10, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _decode_logits(model, ids, steps=2)
    q = model.model.layers[0].self_attn.q_proj
    assert SparseInt8Linear.eligible(q) is None
    saved = {k: v.clone() for k, v in q.state_dict().items()}
    assert deploy(model, "cpu") == (7, 0)
    q2 = model.model.layers[0].self_attn.q_proj
    assert all(torch.equal(saved[k], v) for k, v in q2.state_dict().items())  # 4-bit packed codes round-trip
    with torch.no_grad():
        got = _decode_logits(model, ids, steps=2)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4
    # K follows the sparsifier at call time (mode "dense" = every channel), as in the reference forward
    x = torch.randn(1, 1, q2.in_features)
    q2.input_sparsifier.mode = "dense"
    args = (q2.weight_q, q2.weight_scale.reshape(-1), q2.zero_corr)
    torch.testing.assert_close(q2(x), sparse_int8_reference(x, *args, q2.in_features), rtol=2e-7, atol=1e-6)
    q2.input_sparsifier.mode = "topk"
    torch.testing.assert_close(q2(x), sparse_int8_reference(x, *args, q2.input_sparsifier.keep), rtol=2e-7, atol=1e-6)
    # a group-wise scheme is left to the reference forward
    lin = QuantLinear(64, 32, False, __import__("mmcompress.quant.quantizer", fromlist=["x"]).QuantScheme(4, 16, 32))
    assert "group-wise" in SparseInt8Linear.eligible(lin.pack()) or SparseInt8Linear.eligible(lin) is not None


def test_recipe_quantizes_residual_adapters(cpu_kernel, tokenizer, tmp_path, stable_topk):
    """``adapters: w8a16`` in a quantize step after LaRoSA stores the residual adapters as 8-bit
    weight-only linears (the default keeps them float); they save and load as such and run on the
    integer path when deployed."""
    import mmcompress
    from mmcompress.quant.deployed import IntLinear
    from mmcompress.quant.linear import QuantLinear
    from mmcompress.recipe import RecipeError, parse_recipe
    from mmcompress.sparse.decode import enable_sparse_decode
    from mmcompress.sparse.merge import ResidualAdaptedLayer

    model, tok = _joint_model(tokenizer, adapters="w8a16")
    floats, _ = _joint_model(tokenizer)
    adapted = [m for m in model.modules() if isinstance(m, ResidualAdaptedLayer) and m.residual_adapter is not None]
    assert adapted and all(type(m.residual_adapter) is QuantLinear and m.residual_adapter.packed
                           and m.residual_adapter.scheme.name == "w8a16" for m in adapted)
    f_adapted = [m for m in floats.modules() if isinstance(m, ResidualAdaptedLayer) and m.residual_adapter is not None]
    assert all(type(m.residual_adapter) is torch.nn.Linear for m in f_adapted)
    # the quantized adapter is the RTN grid of the float one (same LaRoSA plan and rotations: same seed)
    for q, f in zip(adapted, f_adapted):
        w = f.residual_adapter.weight.detach().float()
        step = w.abs().amax(1, keepdim=True) / 127
        torch.testing.assert_close(q.residual_adapter.quantized_weight().float(), (w / step).round() * step,
                                   rtol=1e-6, atol=1e-7)
    assert model._mmcompress_description["steps"][1]["residual_adapters"] == {"scheme": "w8a16", "count": len(adapted)}
    ids = torch.randint(0, len(tok) - 10, (1, 10), generator=torch.Generator().manual_seed(4))
    from mmcompress.sparse.joint import quantize_residual_adapters

    assert quantize_residual_adapters(floats, "float") == 0
    assert quantize_residual_adapters(floats) == len(adapted)  # the recipe's step = this after the quantize step
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(floats(input_ids=ids).logits, ref)
    out = mmcompress.save(model, tmp_path / "art")
    back = mmcompress.load(out, runtime="reference")
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref)
    deployed = mmcompress.load(out)  # the integer runtime: adapters on the weight-only int8 kernel
    assert all(isinstance(m.residual_adapter, IntLinear) for m in deployed.modules()
               if isinstance(m, ResidualAdaptedLayer) and m.residual_adapter is not None)
    with torch.no_grad():
        dep_decode, ref_decode = _decode_logits(deployed, ids), _decode_logits(model, ids)
    assert (dep_decode - ref_decode).abs().max() / ref_decode.abs().max() < 1e-4
    enable_sparse_decode(back, "cpu")  # a reference-loaded model: the adapters get deployed as well
    assert all(isinstance(m.residual_adapter, IntLinear) for m in back.modules()
               if isinstance(m, ResidualAdaptedLayer) and m.residual_adapter is not None)
    with pytest.raises(RecipeError, match="adapters must be one of"):
        parse_recipe({"steps": [{"sparsify": {"method": "larosa"}},
                                {"quantize": {"method": "rtn", "adapters": "int3"}}]})


def test_work_split_keeps_results(cpu_kernel):
    """Row parts (split-K) x column blocks: the int8 kernel is exact whatever the split; the float kernel
    changes only the fp32 summation order."""
    from mmcompress.sparse.kernels import sparse_linear

    din, dout = 1003, 517
    _, codes, scale, zero, wq, zc = _weights(din, dout, seed=9)
    x = torch.randn(3, din)
    wt = torch.randn(din, dout)
    prev = cpu_kernel.set_row_split(1)
    try:
        ref8 = sparse_int8_linear(x, wq, scale, zc, 400, backend="cpu")
        reff = sparse_linear(x, wt, 400, backend="cpu")
        for parts in (2, 3, 7):
            cpu_kernel.set_row_split(parts)
            assert torch.equal(sparse_int8_linear(x, wq, scale, zc, 400, backend="cpu"), ref8)
            torch.testing.assert_close(sparse_linear(x, wt, 400, backend="cpu"), reff, rtol=1e-5, atol=1e-4)
    finally:
        cpu_kernel.set_row_split(prev)


def _exact_int8_gemv(x, codes, scale, zc, k, bias):
    """The kernel's arithmetic in torch: exact int32 sums over the kept rows, then its fp32 epilogue."""
    idx, vals = topk_select(x, k, backend="cpu")
    sa = (vals.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-10)
    qa = torch.clamp(torch.round(vals / sa), -127, 127).long()
    u = codes.long().t() + 128  # the stored uint8 codes [in, out]
    acc = torch.stack([qa[b] @ u[idx[b]] for b in range(x.shape[0])])
    a = (acc - zc.long() * qa.sum(-1, keepdim=True)).float()
    return a * (sa * scale.float()) + bias


@pytest.mark.parametrize("batch", range(1, 9))
def test_int8_row_passes_and_tails_exact(cpu_kernel, batch):
    """Kept-row counts that leave every remainder of the multi-group passes (int8_block walks up to four
    4-row interleaves per pass, then single groups; rows padded to a multiple of 4), 64-column chunks with a
    tail, batch 1..8 and every row split: the output equals the exact integer sum + the fp32 epilogue.
    8250 columns: an accumulator too large for L1, so the multi-group passes run (kInt8L1Acc)."""
    din, dout = 160, 8250
    _, codes, scale, zero, wq, zc = _weights(din, dout, seed=batch)
    g = torch.Generator().manual_seed(100 + batch)
    x = torch.randn(batch, din, generator=g)
    bias = torch.randn(dout, generator=g)
    prev = cpu_kernel.set_row_split(0)
    try:
        for k in (1, 3, 4, 5, 8, 12, 15, 16, 17, 20, 28, 31, 32, 33, 36, 47, 64, 65, 159, 160):
            want = _exact_int8_gemv(x, codes, scale, zc, k, bias)
            for parts in (0, 1, 2, 3):
                cpu_kernel.set_row_split(parts)
                got = sparse_int8_linear(x, wq, scale, zc, k, bias, backend="cpu")
                assert torch.equal(got, want), (k, parts)
    finally:
        cpu_kernel.set_row_split(prev)
