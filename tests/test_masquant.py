import copy

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.models.modality import AUDIO, IMAGE, TEXT, modality_context
from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.methods.masquant import (
    MASLinear,
    MASTrainLinear,
    cmc_rank,
    mbr_loss,
    whitened_low_rank,
)
from mmcompress.quant.quantizer import QuantScheme, fake_quantize_weight

from .conftest import mm_inputs, text_samples, tiny_model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def omni(tokenizer):
    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    calib = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=s)[0] for s in range(3)])
    x = mm_inputs("qwen2_5_omni", tok, seed=9, text=" over the lazy dog")[0]
    return model, calib, x


def test_mas_training_form_is_invariant_without_quantization():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    s = torch.rand(3, 32) * 3 + 0.1
    mas = MASTrainLinear(lin, QuantScheme(16, 16), s)
    x = torch.randn(1, 10, 32)
    ids = torch.tensor([[0, 1, 1, 2, 2, 0, 3, 0, 1, 2]])
    with modality_context(ids):
        assert torch.allclose(mas(x), lin(x), atol=1e-5)


def test_equal_vectors_reduce_to_smoothquant_and_ones_to_rtn():
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 16)
    scheme = QuantScheme(4, 8)
    x = torch.randn(1, 9, 32)
    ids = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2]])
    s = torch.rand(32) + 0.5
    mas = MASTrainLinear(lin, scheme, s.expand(3, 32))
    sq = QuantLinear.from_linear(lin, scheme, smoothing_rows=1)
    sq.weight.data.mul_(s)
    sq.input_smoothing.mul_(s)
    rtn = QuantLinear.from_linear(lin, scheme)
    with modality_context(ids):
        assert torch.allclose(mas(x), sq(x), atol=1e-5)
        ones = MASTrainLinear(lin, scheme, torch.ones(3, 32))
        assert torch.allclose(ones(x), rtn(x), atol=1e-5)


def test_full_rank_cmc_reproduces_split_weights_exactly():
    """Quantized target, no activation quantization, full rank: E17 == E8 on every modality."""
    torch.manual_seed(2)
    in_f, out_f = 24, 20
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    s = torch.rand(3, in_f, dtype=torch.float64) * 2 + 0.2
    scheme = QuantScheme(4, 16, 0, True)
    w_hat = fake_quantize_weight(w * s[TEXT], 4).double()
    x = torch.randn(1, 12, in_f, dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2] * 4])
    mas = MASLinear(in_f, out_f, False, scheme, 3, dtype=torch.float64, rank=min(in_f, out_f))
    mas.weight.data.copy_(w * s[TEXT])
    mas.input_smoothing.copy_(s.float())
    mas.input_smoothing.data = s.clone()
    for m in (IMAGE, AUDIO):
        xm = x[0][ids[0] == m] / s[m]
        moment = xm.T @ xm + torch.eye(in_f, dtype=torch.float64)
        target = fake_quantize_weight(w * s[m], 4).double()
        left, right = whitened_low_rank(target - w_hat, moment, min(in_f, out_f))
        mas.cmc_left[m].copy_(left)
        mas.cmc_right[m].copy_(right)
    with modality_context(ids):
        y = mas(x)
    for m in (TEXT, IMAGE, AUDIO):
        sel = ids[0] == m
        expected = (x[0][sel] / s[m]) @ fake_quantize_weight(w * s[m], 4).double().T
        assert torch.allclose(y[0][sel], expected, atol=1e-9), m


def test_whitened_low_rank_error_decreases_with_rank_and_beats_plain_svd():
    torch.manual_seed(3)
    in_f, out_f = 48, 40
    # activations with a few dominant directions (as real activations have)
    basis = torch.randn(in_f, in_f, dtype=torch.float64)
    x = torch.randn(500, in_f, dtype=torch.float64) @ torch.diag(torch.logspace(1, -2, in_f, dtype=torch.float64)) @ basis
    dw = torch.randn(out_f, in_f, dtype=torch.float64)
    moment = x.T @ x
    errs, plain = [], []
    for r in (2, 4, 8, 16, 32, 40):
        left, right = whitened_low_rank(dw, moment, r)
        errs.append((x @ (dw.T - left @ right)).norm().item())
        pl, pr = whitened_low_rank(dw, None, r)
        plain.append((x @ (dw.T - pl @ pr)).norm().item())
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-6 * errs[0]
    assert all(w <= p + 1e-9 for w, p in zip(errs, plain))
    assert errs[1] < 0.9 * plain[1]


def test_rank_rule():
    assert cmc_rank(0.05, 2048, 11008) == 102
    assert cmc_rank(0.05, 2048, 256) == 32  # floor
    assert cmc_rank(1.0, 64, 32) == 32  # 1 = full rank
    assert cmc_rank(16, 64, 32) == 16  # absolute
    assert cmc_rank(0, 64, 32) == 0


def test_mbr_loss_weights_and_absent_modality():
    y, t = torch.zeros(1, 4, 2), torch.ones(1, 4, 2)
    ids = torch.tensor([[0, 0, 1, 1]])
    assert torch.isclose(mbr_loss(y, t, ids, {0: 1.0, 1: 1.0, 2: 1.0}), (y - t).abs().mean())
    assert torch.isclose(mbr_loss(y, t, ids, {0: 1.0, 1: 0.5, 2: 7.0}), torch.tensor(0.75))
    assert torch.isfinite(mbr_loss(y, t, torch.zeros(1, 4, dtype=torch.long), {0: 1.0, 1: 0.5, 2: 1.0}))


def test_masquant_without_quantization_leaves_logits_unchanged(omni):
    model, calib, x = omni
    ref = model(**x).logits
    for cmc in ("split", "whitened"):
        m = copy.deepcopy(model)
        mmcompress.quantize(m, calib, "masquant", QuantScheme(16, 16), progress=False, cmc=cmc, rank=1.0, epochs=1)
        assert _rel(m(**x).logits, ref) < 1e-4, cmc


def test_masquant_learns_and_cmc_tracks_split(omni):
    model, calib, x = omni
    ref = model(**x).logits
    errs = {}
    for name, method, kw in [("sq", "smoothquant", {}), ("split", "masquant", {"cmc": "split"}),
                             ("cmc", "masquant", {"cmc": "whitened"})]:
        m = copy.deepcopy(model)
        mmcompress.quantize(m, calib, method, "w4a8", progress=False, **kw)
        errs[name] = _rel(m(**x).logits, ref)
        if name == "cmc":
            info = m._mmcompress_description["layers"][0]["masquant"]
            assert info["loss_last"] < info["loss_first"]
            q = m.model.language_model.layers[0].self_attn.q_proj
            assert isinstance(q, MASLinear) and q.rank > 0 and q.packed
            assert set(info["divergence"]["self_attn.q_proj"]) == {"image", "audio"}
            summary = m._mmcompress_description["method_summary"]
            assert summary["cmc_bytes"] > 0 and summary["cmc_flops_per_token"]["audio"] > 0
    assert errs["cmc"] < errs["sq"], errs


def test_masquant_on_text_only_model_is_learned_smoothquant(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    m = mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=3)), "masquant", "w4a8", progress=False, epochs=1)
    assert "learned SmoothQuant" in m._mmcompress_description["method_summary"]["note"]
    assert m.model.layers[0].self_attn.q_proj.rank == 0


def test_masquant_save_load_roundtrip(omni, tmp_path):
    model, calib, x = omni
    m = copy.deepcopy(model)
    mmcompress.quantize(m, calib, "masquant", "w4a8", progress=False, epochs=1)
    y = m(**x).logits
    loaded = mmcompress.load(mmcompress.save(m, tmp_path / "mas"), runtime="reference")
    assert torch.equal(loaded(**x).logits, y)


def test_randomized_top_svd_is_near_optimal_and_reproducible():
    """The CMC truncation on a 576-wide layer (rank 32) uses a randomized SVD: its whitened residual must
    be within 1 % of the exact truncated SVD's (Eckart–Young optimum), and two calls must agree bitwise."""
    from mmcompress.quant.methods.masquant import top_svd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 576, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 576, dtype=torch.float64)
    dw = torch.randn(576, 1536, generator=g, dtype=torch.float64) * 0.01  # quantization-noise-like residual
    c = x.T @ x
    left, right = whitened_low_rank(dw.T, c, 32)
    err = (x @ (dw - left @ right)).norm()
    p, s, qh = torch.linalg.svd(torch.linalg.cholesky(c).T @ dw, full_matrices=False)
    optimum = (s[32:] ** 2).sum().sqrt()
    assert err <= 1.01 * optimum
    a, b, c2 = top_svd(dw, 32)
    a2, b2, c3 = top_svd(dw, 32)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(c2, c3)


def test_top_svd_with_a_left_factor_equals_the_multiplied_matrix():
    """``top_svd(a, r, left=T)`` applies ``T`` on the fly (randomized branch) or multiplies it in (exact branch, or
    when that is cheaper): the same triplets as ``top_svd(T @ a, r)`` to float64 round-off."""
    from mmcompress.quant.methods.masquant import top_svd

    g = torch.Generator().manual_seed(0)
    for n_in, n_out, rank in ((300, 900, 8), (300, 200, 8), (120, 100, 32)):  # on the fly / cheaper multiplied / exact
        t = torch.linalg.cholesky(torch.cov(torch.randn(n_in, 4 * n_in, generator=g, dtype=torch.float64))).T
        a = torch.randn(n_in, n_out, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n_out, dtype=torch.float64)
        p1, s1, q1 = top_svd(a, rank, left=t)
        p2, s2, q2 = top_svd(t @ a, rank)
        assert torch.allclose(s1, s2, rtol=1e-10, atol=0)
        lr1, lr2 = (p1 * s1) @ q1, (p2 * s2) @ q2
        assert float((lr1 - lr2).norm() / lr2.norm()) < 1e-10, (n_in, n_out)


def test_orthonormal_blocks_cholesky_qr2_and_its_fallback(monkeypatch):
    """A well-conditioned block: CholeskyQR2 (orthonormal to round-off, y = QR).  A rank-deficient or badly
    conditioned one: Householder QR, the same two properties."""
    from mmcompress.quant.methods.masquant import _orthonormal

    g = torch.Generator().manual_seed(1)
    good = torch.randn(500, 40, generator=g, dtype=torch.float64)
    bad = good.clone()
    bad[:, 7] = bad[:, 3]  # rank deficient: Cholesky of yᵀy fails
    worse = good * torch.logspace(0, -9, 40, dtype=torch.float64)  # condition number ~1e9: the checks refuse it
    for y in (good, bad, worse):
        q, r = _orthonormal(y)
        assert torch.allclose(q.T @ q, torch.eye(40, dtype=torch.float64), atol=1e-12)
        assert float((q @ r - y).norm() / y.norm()) < 1e-13
        assert torch.equal(r, r.triu())
    calls = []
    real = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda y: calls.append(y.shape) or real(y))
    _orthonormal(good)
    assert calls == []
    _orthonormal(bad)
    _orthonormal(worse)
    assert len(calls) == 2


def test_project_divergence_keeps_k_channels():
    from mmcompress.quant.methods.masquant import project_divergence

    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 40, generator=g) + 0.5
    s[AUDIO, 7] = 50.0  # the largest divergence must survive
    out = project_divergence(s.clone(), [TEXT, IMAGE, AUDIO], 5)
    for m in (IMAGE, AUDIO):
        assert int((out[m] != out[TEXT]).sum()) <= 5
    assert out[AUDIO, 7] == 50.0 and torch.equal(out[TEXT], s[TEXT])
    assert torch.equal(project_divergence(s.clone(), [TEXT, IMAGE, AUDIO], 40), s)  # k >= width: unchanged


def test_divergence_budget_is_respected_in_the_deployed_model(omni):
    model, calib, x = omni
    ref = model(**x).logits
    m = copy.deepcopy(model)
    mmcompress.quantize(m, calib, "masquant", "w4a8", progress=False, epochs=1, divergence=4)
    q = m.model.language_model.layers[0].self_attn.q_proj
    rows = q.input_smoothing
    for mod in (IMAGE, AUDIO):
        assert 0 < int((rows[mod] != rows[TEXT]).sum()) <= 4
    assert _rel(m(**x).logits, ref) < 0.5  # still a working model
    with pytest.raises(ValueError, match="divergence"):
        mmcompress.quantize(copy.deepcopy(model), calib, "masquant", "w4a8", progress=False, divergence="some")


def test_split_is_trained_with_the_same_divergence_budget_as_cmc(omni):
    """"CMC vs split" compares like with like: by default the split form is trained under CMC's budget
    (rows differ from text on at most r channels); ``divergence="free"`` trains both freely."""
    model, calib, x = omni
    q_path = "model.language_model.layers.0.self_attn.q_proj"
    rows = {}
    for cmc, div in [("whitened", "cmc"), ("split", "cmc"), ("split", "free")]:
        m = copy.deepcopy(model)
        mmcompress.quantize(m, calib, "masquant", "w4a8", progress=False, epochs=1, cmc=cmc, divergence=div,
                            rank=4, rank_floor=0)
        q = m.get_submodule(q_path)
        rows[cmc, div] = [int((q.input_smoothing[mod] != q.input_smoothing[TEXT]).sum()) for mod in (IMAGE, AUDIO)]
    assert all(0 < n <= 4 for n in rows["whitened", "cmc"] + rows["split", "cmc"]), rows
    assert all(n > 4 for n in rows["split", "free"]), rows


def test_cmc_overhead_counts_the_bytes_saved_on_a_bf16_model(tokenizer):
    """The CMC memory overhead is counted on the layer as saved (bf16 factors on a bf16 model), not on
    the float32 copy the training step runs on (which doubled it)."""
    from mmcompress.quant.methods.masquant import MASLinear

    model, tok = tiny_model("qwen2_5_vl", tokenizer=tokenizer, dtype=torch.bfloat16)
    calib = CalibrationSet([mm_inputs("qwen2_5_vl", tok, seed=s)[0] for s in range(2)])
    mmcompress.quantize(model, calib, "masquant", "w4a8", progress=False, epochs=1, loss_weights="scripted")
    summary = model._mmcompress_description["method_summary"]
    cmc = [m for m in model.modules() if isinstance(m, MASLinear) and m.rank]
    assert cmc and {m.cmc_left.dtype for m in cmc} == {torch.bfloat16} and summary["modalities"] == ["text", "image"]
    assert summary["cmc_bytes"] == sum(m.cmc_left.element_size() * m.rank * (m.in_features + m.out_features)
                                       for m in cmc)


def test_whitening_is_computed_once_per_group_and_modality(omni, monkeypatch):
    """With ``tie`` q/k/v (one smoothing) share the factor of C_m, and gate/up theirs; a given factor
    changes nothing, bit for bit."""
    import mmcompress.quant.methods.masquant as mq

    torch.manual_seed(0)
    x = torch.randn(200, 48, dtype=torch.float64)
    c, dw = x.T @ x, torch.randn(40, 48, dtype=torch.float64)
    fresh = whitened_low_rank(dw, c, 8)
    given = whitened_low_rank(dw, c, 8, factor=mq.whitening(c))
    assert all(torch.equal(a, b) for a, b in zip(fresh, given))

    calls = {"whitening": 0, "fits": 0}
    real_w, real_fit = mq.whitening, mq.whitened_low_rank

    def count_w(*a, **k):
        calls["whitening"] += 1
        return real_w(*a, **k)

    def count_fit(*a, **k):
        calls["fits"] += 1
        return real_fit(*a, **k)

    monkeypatch.setattr(mq, "whitening", count_w)
    monkeypatch.setattr(mq, "whitened_low_rank", count_fit)
    model, calib, _ = omni
    m = copy.deepcopy(model)
    mmcompress.quantize(m, calib, "masquant", "w4a8", progress=False, epochs=0, tie=True)
    masl = [mod for mod in m.modules() if isinstance(mod, MASLinear) and mod.rank]
    # per layer and non-text modality: q, k, v (attn_in), gate, up (mlp_in), o (attn_out): 6 fits, 3 factors
    assert calls["fits"] == len(masl) * 2 and calls["fits"] == 2 * calls["whitening"]
