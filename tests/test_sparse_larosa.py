"""LaRoSA correctness (docs/larosa.md §9.2): dense invariance, sparse equivalence, accounting, calibration."""

import pytest
import torch

import mmcompress
from mmcompress.models.adapters import get_adapter
from mmcompress.sparse import plan as plans
from mmcompress.sparse.api import measure_sparsity, sparsify
from mmcompress.sparse.linear import SparseLinear
from mmcompress.sparse.merge import inner_layer, merge_rotations, rotate_reference
from mmcompress.sparse.methods.larosa import apply_topk_plan
from mmcompress.sparse.rotation import MomentCollector, Rotations, calibrate_rotations, rotation_from_moment
from mmcompress.sparse.topk import topk_sparsify

from .conftest import mm_inputs, text_samples, tiny_model

KINDS = [("llama", False), ("qwen2", True), ("mistral", False)]  # qwen2: q/k/v bias, GQA, tied embeddings


def _f64_rmsnorm(self, h):
    eps = getattr(self, "variance_epsilon", None) or self.eps
    hd = h.double()
    return (self.weight.double() * (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps))).to(h.dtype)


@pytest.fixture
def f64_norms(monkeypatch):
    """transformers' RMSNorm computes in float32 even for float64 models; for round-off checks make it fp64."""
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.mistral.modeling_mistral as mistral
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    for cls in (llama.LlamaRMSNorm, qwen2.Qwen2RMSNorm, mistral.MistralRMSNorm):
        monkeypatch.setattr(cls, "forward", _f64_rmsnorm)


def _model(kind, tie, tokenizer, dtype=torch.float64, layers=3):
    model, tok = tiny_model(kind, tokenizer=tokenizer, tie=tie, layers=layers, dtype=dtype)
    return model, tok, get_adapter(model)


def _random_rotations(n, d, mode="merged", seed=0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] for _ in range(n)]
    return Rotations(mode, mats, [torch.ones(d)] * n)


@pytest.mark.parametrize("kind,tie", KINDS)
def test_merged_dense_equals_original_fp64(tokenizer, f64_norms, kind, tie):
    model, tok, ad = _model(kind, tie, tokenizer)
    assert ad.tied == tie
    x = torch.randint(0, len(tok) - 10, (2, 17))
    y0 = model(input_ids=x).logits
    rot = calibrate_rotations(model, ad, text_samples(tok), progress=False)
    merge_rotations(model, ad, rot)
    assert not ad.tied
    y1 = model(input_ids=x).logits
    assert (y1 - y0).abs().max() <= 1e-10
    # a random orthogonal basis is just as exact (invariance does not depend on the PCA)
    model, tok, ad = _model(kind, tie, tokenizer)
    merge_rotations(model, ad, _random_rotations(len(ad.layers), ad.text_config.hidden_size))
    assert (model(input_ids=x).logits - y0).abs().max() <= 1e-10


@pytest.mark.parametrize("kind,tie", KINDS)
def test_merged_dense_equals_original_fp32(tokenizer, kind, tie):
    model, tok, ad = _model(kind, tie, tokenizer, dtype=torch.float32)
    x = torch.randint(0, len(tok) - 10, (1, 23))
    y0 = model(input_ids=x).logits
    sparsify(model, text_samples(tok), "larosa", 0.0, progress=False)
    y1 = model(input_ids=x).logits
    assert ((y1 - y0).abs().max() / y0.abs().max()) < 1e-4
    assert any(type(m).__name__ == "ResidualAdaptedLayer" for m in model.modules())


def _simulate(model, ad, qs, plan, mode):
    """Unmerged run-time simulation: Mode M TopK(RMS(h)Q)Qᵀ diag(γ) Wᵀ; Mode R TopK((γ⊙RMS(h))Q)Qᵀ Wᵀ;
    magnitude Top-K on the o and down inputs."""
    groups = {g.name: g for g in ad.groups}
    handles = []
    for i, layer in enumerate(ad.layers):
        q = qs[i]
        for gname, act in (("attn_in", "h1"), ("mlp_in", "h3")):
            norm = layer.get_submodule(groups[gname].producer)
            k = plan.keep(i, act)

            def hook(mod, args, out, q=q, k=k):
                gamma = mod.weight.double()
                u = out / gamma if mode == "merged" else out
                u = topk_sparsify(u @ q, k) @ q.T
                return u * gamma if mode == "merged" else u

            handles.append(norm.register_forward_hook(hook))
        for gname, act in (("attn_out", "h2"), ("mlp_out", "h4")):
            lin = groups[gname].modules(layer)[0]
            k = plan.keep(i, act)
            handles.append(lin.register_forward_pre_hook(lambda m, a, k=k: (topk_sparsify(a[0], k),)))
    return handles


@pytest.mark.parametrize("kind,tie", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("mode", ["merged", "reference"])
def test_sparse_merged_equals_unmerged_simulation(tokenizer, f64_norms, kind, tie, mode):
    model, tok, ad = _model(kind, tie, tokenizer)
    x = torch.randint(0, len(tok) - 10, (1, 19))
    y_dense = model(input_ids=x).logits
    rot = calibrate_rotations(model, ad, text_samples(tok), mode=mode, progress=False)
    shapes = plans.layer_shapes(ad)
    ref, _, ad_ref = _model(kind, tie, tokenizer)
    for s in (0.4, 0.5):  # the reference's 0.8/1.2 split: (0.32, 0.48) and (0.40, 0.60)
        plan = plans.uniform(shapes, s)
        handles = _simulate(ref, ad_ref, rot.matrices, plan, mode)
        y_sim = ref(input_ids=x).logits
        for h in handles:
            h.remove()
        m, _, am = _model(kind, tie, tokenizer)
        (merge_rotations if mode == "merged" else rotate_reference)(m, am, rot)
        apply_topk_plan(m, am, plan)
        y = m(input_ids=x).logits
        assert (y - y_sim).abs().max() <= 1e-9
        assert (y - y_dense).abs().max() > 1e-2  # not vacuous: the sparse model differs from the dense one


def test_modes_select_different_coordinates(tokenizer):
    outs = []
    x = torch.randint(0, 400, (1, 19))
    for mode in ("merged", "reference"):
        model, tok, ad = _model("llama", False, tokenizer)
        sparsify(model, text_samples(tok), "larosa", 0.4, mode=mode, progress=False)
        assert model._mmcompress_description["method"]["mode"] == mode
        outs.append(model(input_ids=x).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_zero_fraction_is_exactly_one_minus_k_over_d(tokenizer):
    model, tok, ad = _model("qwen2", True, tokenizer, dtype=torch.float32)
    samples = text_samples(tok, n=2)
    sparsify(model, samples, "larosa", 0.45, progress=False)
    plan_levels = model._mmcompress_description["method"]["levels"]
    seen = {}
    handles = []
    for i, layer in enumerate(ad.layers):
        for name, mod in inner_layer(layer).named_modules():
            if isinstance(mod, SparseLinear):
                def hook(m, a, key=(i, name)):
                    nz = (m.sparsify(a[0]) != 0).sum(-1)
                    assert torch.all(nz == m.keep), key  # exactly K per token
                    seen[key] = 1 - m.keep / m.in_features
                handles.append(mod.register_forward_pre_hook(hook))
    model(**samples[0])
    for h in handles:
        h.remove()
    assert len(seen) == 7 * len(ad.layers)
    for (i, name), z in seen.items():
        act = plans.ACTIVATION_OF[plans.projection_name(name)]
        assert z == pytest.approx(plan_levels[act][i], abs=1e-6)
    measured = measure_sparsity(model, samples, ad)
    desc = model._mmcompress_description["method"]
    assert measured["model_sparsity"] == pytest.approx(desc["model_sparsity"], abs=1e-5)
    assert desc["model_sparsity"] == pytest.approx(0.45, abs=2e-2)  # integer K on widths of 64/128


def test_plan_accounting():
    shapes = [plans.LayerShape({"q": 4096 * 4096, "k": 4096 * 4096, "v": 4096 * 4096, "o": 4096 * 4096,
                                "gate": 11008 * 4096, "up": 11008 * 4096, "down": 11008 * 4096},
                               {"h1": 4096, "h2": 4096, "h3": 4096, "h4": 11008})] * 2
    u = plans.uniform(shapes, 0.4)
    assert u.model_sparsity() == pytest.approx(0.369, abs=1e-3)  # LLaMA2-7B: 0.922·s (docs §3.1)
    for p in (0.25, 0.4, 0.5):
        e = plans.exact(shapes, p)
        assert abs(e.model_sparsity() - p) < 1e-4
        assert e.level(0, "h1") == pytest.approx(0.8 * p, abs=1e-3)
        num = sum(e.levels[0][m] * shapes[0].masses[m] for m in plans.PROJECTIONS) * 2
        assert e.model_sparsity() == pytest.approx(num / (2 * shapes[0].total))
    with pytest.raises(ValueError):
        plans.uniform(shapes, 0.85)


def test_calibration_pca(tokenizer):
    model, tok, ad = _model("llama", False, tokenizer)
    samples = text_samples(tok)
    from mmcompress.engine import run_layerwise

    col = MomentCollector("merged")
    run_layerwise(model, ad, col, samples, progress=False)
    assert len(col.moments) == len(ad.layers) and col.tokens == 4 * 32
    for h in col.moments:
        assert torch.allclose(h, h.T) and torch.linalg.eigvalsh(h).min() > -1e-9
        q, ev = rotation_from_moment(h)
        assert (q.T @ q - torch.eye(q.shape[0], dtype=q.dtype)).abs().max() < 1e-10
        assert torch.all(ev[:-1] >= ev[1:])
    # energy kept by Top-K in the PCA basis >= in the raw basis (on the calibration tokens)
    rot = calibrate_rotations(model, ad, samples, progress=False)
    xs = []
    norm = ad.layers[1].input_layernorm
    h = norm.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    for s in samples:
        model(**s)
    h.remove()
    x = torch.cat(xs)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    k = 16
    raw = topk_sparsify(x, k).pow(2).sum()
    rotated = topk_sparsify(x @ rot.matrices[1], k).pow(2).sum()
    assert rotated >= raw


@pytest.mark.parametrize("kind,method,mode,prefill", [
    ("qwen2", "larosa", "merged", "all"),
    ("gemma3", "larosa", "reference", "none"),
    ("llama", "teal", "merged", "last_half"),
    ("mistral", "cats", "merged", "all"),
])
def test_save_load_same_logits(tmp_path, tokenizer, kind, method, mode, prefill):
    model, tok, ad = _model(kind, kind == "qwen2", tokenizer, dtype=torch.float32, layers=2)
    x = torch.randint(0, len(tok) - 10, (1, 20))
    sparsify(model, text_samples(tok), method, 0.4, mode=mode, prefill=prefill, progress=False)
    y = model(input_ids=x).logits
    out = mmcompress.save(model, tmp_path / "art")
    loaded = mmcompress.load(out)
    assert torch.equal(loaded(input_ids=x).logits, y)
    assert loaded._mmcompress_description["method"]["method"] == method


def test_gemma3_merged_is_refused(tokenizer):
    model, tok, ad = _model("gemma3", False, tokenizer, dtype=torch.float32, layers=2)
    with pytest.raises(NotImplementedError, match="post-attention"):
        sparsify(model, text_samples(tok), "larosa", 0.4, mode="merged", progress=False)
    x = torch.randint(0, len(tok) - 10, (1, 20))
    y0 = model(input_ids=x).logits
    rot = calibrate_rotations(model, ad, text_samples(tok), mode="reference", progress=False)
    rotate_reference(model, ad, rot)  # Mode R is exact at sparsity 0
    assert ((model(input_ids=x).logits - y0).abs().max() / y0.abs().max()) < 1e-4


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_5_omni"])
def test_multimodal_merged_dense_equals_original(tokenizer, kind):
    model, tok = tiny_model(kind, tokenizer=tokenizer, layers=2)
    ad = get_adapter(model)
    calib = [mm_inputs(kind, tok, seed=s)[0] for s in range(2)]
    x = mm_inputs(kind, tok, seed=3)[0]
    y0 = model(**x).logits
    sparsify(model, calib, "larosa", 0.0, progress=False)  # rotates the towers' output projections too
    y1 = model(**x).logits
    assert ((y1 - y0).abs().max() / y0.abs().max()) < 1e-4


@pytest.mark.parametrize("kind,tie", KINDS)
def test_column_scale_is_exact_dense_and_changes_the_selection(tokenizer, f64_norms, kind, tie):
    model, tok, ad = _model(kind, tie, tokenizer)
    x = torch.randint(0, len(tok) - 10, (1, 17))
    y0 = model(input_ids=x).logits
    rot = calibrate_rotations(model, ad, text_samples(tok), progress=False)
    plain, _, ap = _model(kind, tie, tokenizer)
    merge_rotations(plain, ap, rot)
    merge_rotations(model, ad, rot, column_scale=True)
    assert (model(input_ids=x).logits - y0).abs().max() <= 1e-10  # dense: still the original model
    groups = {g.name: g for g in ad.groups}
    layer, layer_p = inner_layer(ad.layers[0]), inner_layer(ap.layers[0])
    g = groups["mlp_in"]
    c = ad.norm_scale(layer.get_submodule(g.producer))
    assert not torch.allclose(c, torch.ones_like(c))  # the norm carries the column scale ...
    w = torch.cat([layer.get_submodule(r).weight for r in g.readers])
    w_p = torch.cat([layer_p.get_submodule(r).weight for r in g.readers])
    torch.testing.assert_close(w * c, w_p)  # ... and the readers its inverse
    cols = w.pow(2).sum(0).sqrt()
    assert torch.allclose(cols, cols.mean().expand_as(cols), rtol=1e-9)  # every reader column has the same norm
    shapes = plans.layer_shapes(ad)
    plan = plans.uniform(shapes, 0.5)
    apply_topk_plan(model, ad, plan)
    apply_topk_plan(plain, ap, plan)
    assert (model(input_ids=x).logits - plain(input_ids=x).logits).abs().max() > 1e-4  # another selection


def test_column_scale_only_in_merged_mode(tokenizer):
    model, tok, ad = _model("llama", False, tokenizer, dtype=torch.float32)
    with pytest.raises(ValueError, match="merged mode only"):
        sparsify(model, text_samples(tok), "larosa", 0.4, mode="reference", column_scale=True, progress=False)


class _Float64Sizes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every float64 tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("tie", [False, True])
def test_merge_outside_rotates_embedding_and_head_in_slices(tokenizer, monkeypatch, tie):
    """The embedding/head fold ``E Q_1``, ``H diag(γ_f) Q_L`` (and the layers' readers and writers) run a
    slice of ``ROTATE_CHUNK`` float64 elements at a time: no float64 copy of a whole [V, d] matrix (it set
    the peak of a streamed LaRoSA run), and the same weights as the one-piece product."""
    import mmcompress.sparse.merge as merge

    model, tok, ad = _model("qwen2", tie, tokenizer, dtype=torch.float32)
    v, d = ad.embed_tokens.weight.shape
    rot = _random_rotations(len(ad.layers), d)
    ref = {k: t.clone() for k, t in model.state_dict().items()}
    whole = _model("qwen2", tie, tokenizer, dtype=torch.float32)[0]
    merge_rotations(whole, get_adapter(whole), rot)  # slices larger than every matrix: one piece each
    assert v * d <= merge.ROTATE_CHUNK
    chunk = 3 * d + 5  # a few rows of the embedding/head; the last slice shorter
    monkeypatch.setattr(merge, "ROTATE_CHUNK", chunk)
    with _Float64Sizes() as seen:
        merge_rotations(model, ad, rot)
    assert max(seen.sizes) <= max(chunk + d, d * d) < v * d, max(seen.sizes)
    a, b = model.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
