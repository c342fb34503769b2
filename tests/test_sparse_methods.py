"""Sparse methods in the engine's shape: registered classes with option tables, observers through the
layer context (one pass per layer, composable), one level -> K, selector types."""

import pytest
import torch

from mmcompress.engine import Compose, Method, run_layerwise
from mmcompress.models.adapters import get_adapter
from mmcompress.options import OptionError
from mmcompress.recipe import RecipeError, parse_recipe
from mmcompress.sparse.api import make_sparse_method, sparsify
from mmcompress.sparse.linear import SparseLinear
from mmcompress.sparse.methods import SPARSE_METHODS
from mmcompress.sparse.methods.teal import MagnitudeSampler, _teal_select
from mmcompress.sparse.rotation import MomentCollector
from mmcompress.sparse.topk import Dense, Threshold, TopK, check_level, keep_count, topk_sparsify

from .conftest import text_samples, tiny_model


def _norm_inputs(model, adapter, samples):
    """Every layer's attention-norm input, from plain whole-model forwards (no engine)."""
    seen = {i: [] for i in range(len(adapter.layers))}
    handles = [layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach()))
               for i, layer in enumerate(adapter.layers)]
    with torch.no_grad():
        for s in samples:
            model(**s, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_observers_see_each_layer_once_and_are_removed(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer, dtype=torch.float64, layers=3)
    ad = get_adapter(model)
    samples = text_samples(tok, n=3)
    col = MomentCollector("reference")  # H_l = Σ yᵀy of the norm's output
    run_layerwise(model, ad, col, samples, progress=False)
    ref = _norm_inputs(model, ad, samples)
    assert len(col.moments) == len(ad.layers) and col.tokens == 3 * 32
    for i, layer in enumerate(ad.layers):
        y = torch.cat([layer.input_layernorm(x).reshape(-1, x.shape[-1]) for x in ref[i]]).double()
        assert torch.allclose(col.moments[i], y.T @ y, rtol=1e-9, atol=1e-9)  # seen once, on this layer's pass
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_compose_runs_methods_in_one_walk_with_the_same_results(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer, layers=2)
    ad = get_adapter(model)
    samples = text_samples(tok, n=2)
    alone_m, alone_s = MomentCollector("merged"), MagnitudeSampler(_teal_select, nsamples=2)
    run_layerwise(model, ad, alone_m, samples, progress=False)
    run_layerwise(model, ad, alone_s, samples, progress=False)

    walks = []

    class Count(Method):
        name = "count"

        def step(self, ctx):
            walks.append(ctx.index)

    both_m, both_s = MomentCollector("merged"), MagnitudeSampler(_teal_select, nsamples=2)
    composed = Compose(both_m, both_s, Count())
    assert composed.distributed is False and composed.config()["steps"][0]["method"] == "larosa-rotation"
    run_layerwise(model, ad, composed, samples, progress=False)
    assert walks == [0, 1]
    assert all(torch.equal(a, b) for a, b in zip(alone_m.moments, both_m.moments))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(alone_s.values, both_s.values) for k in a)


def test_one_level_to_k_and_one_range_check():
    assert keep_count(100, 0.4) == 60 and keep_count(10, 0.0) == 10 and keep_count(10, 0.99) == 1
    for bad in (1.0, -0.1, float("nan"), True, "0.4"):
        with pytest.raises(ValueError, match="sparsity must be a finite number in"):
            check_level(bad)
        with pytest.raises(ValueError):
            keep_count(10, bad)
    with pytest.raises(OptionError):  # the option tables use the same validator
        SPARSE_METHODS["teal"](sparsity=1.0)


def test_selectors():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(2, 3, 16)
    top = SparseLinear.from_linear(lin, TopK(5))
    assert top.selector == TopK(5) and top.mode == "topk" and top.keep == 5
    assert torch.equal(top.sparsify(x), topk_sparsify(x, 5))
    thr = SparseLinear.from_linear(lin, Threshold(0.5))
    assert thr.selector == Threshold(0.5) and thr.spec()["mode"] == "threshold" and thr.spec()["keep"] == 16
    assert torch.equal(thr.sparsify(x), x * (x.abs() >= 0.5))
    back = SparseLinear.from_spec(thr.spec())
    assert back.selector == Threshold(0.5)
    thr.selector = Dense()
    assert torch.equal(thr.sparsify(x), x)
    with pytest.raises(TypeError):
        thr.selector = 0.5


def test_registry_options_are_the_recipe_and_api_checks(tokenizer):
    assert set(SPARSE_METHODS) == {"larosa", "teal", "cats", "wina"}
    assert make_sparse_method("teal", sparsity=0.3, mode="merged").config() == {"method": "teal", "sparsity": 0.3,
                                                                              "prefill": "all", "plan": "uniform"}
    with pytest.raises(OptionError, match="unknown option 'mode' for method teal; valid: plan, prefill, sparsity"):
        make_sparse_method("teal", mode="reference")
    with pytest.raises(RecipeError, match=r"recipe step 1 \(cats\): plan must be one of exact, uniform"):
        parse_recipe({"steps": [{"sparsify": {"method": "cats", "plan": "greedy"}}]})
    with pytest.raises(RecipeError, match="unknown option 'colum_scale'"):
        parse_recipe({"steps": [{"sparsify": {"method": "larosa", "colum_scale": True}}]})
    model, tok = tiny_model("llama", tokenizer=tokenizer, layers=2)
    with pytest.raises(OptionError, match="prefill must be one of all, none"):
        sparsify(model, text_samples(tok, n=1), "wina", 0.3, prefill="last_half", progress=False)


def test_sequence_keeps_the_chains_its_steps_need():
    """Passes per layer of a recipe's walk: one per chain the sequence keeps, plus the engine's pass."""
    from mmcompress.engine import Sequence
    from mmcompress.quant.api import make_method
    from mmcompress.quant.quantizer import resolve_scheme
    from mmcompress.sparse.methods.larosa import LaRoSALayers
    from mmcompress.sparse.methods.wina import WinaLayers

    w8a8 = resolve_scheme("w8a8")
    rtn, sq = make_method("rtn", w8a8), make_method("smoothquant", w8a8)
    assert Sequence(LaRoSALayers(0.4), rtn)._kept == [0]  # the dense chain LaRoSA observes
    assert Sequence(LaRoSALayers(0.4), sq)._kept == [0, 1]  # + the sparse chain of SmoothQuant's statistics
    assert Sequence(WinaLayers(0.4), rtn)._kept == []  # WINA reads weights only
    alone = Sequence(LaRoSALayers(0.4))
    assert alone._kept == [] and alone.observe_then_change and not alone.resumable
