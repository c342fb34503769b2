"""The plan searches in the layer-by-layer walk (LaRoSA ``grid`` and ``greedy``, WINA ``greedy``) give what
the whole-model stages give (:func:`larosa`, :func:`wina`): the same K in every module spec, the same
tensors, the same description; streamed, one decoder layer is in memory at a time."""

from __future__ import annotations

import copy

import pytest
import torch

from mmcompress.models.adapters import get_adapter
from mmcompress.specs import module_specs
from mmcompress.sparse.api import make_sparse_method
from mmcompress.sparse.methods.larosa import larosa
from mmcompress.sparse.methods.wina import wina

from .conftest import text_samples, tiny_model


def _both(model, staged, method, samples):
    """(staged description, walk description) on two copies of ``model``; the copies are returned too."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    d_staged = staged(a, get_adapter(a), samples)
    m = make_sparse_method(method["method"], **{k: v for k, v in method.items() if k != "method"})
    assert m.layer_method() is not None  # one walk
    d_walk = m.apply(b, get_adapter(b), samples, progress=False)
    return a, d_staged, b, d_walk


def _same_model(a, b):
    assert module_specs(a) == module_specs(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind, tie, mode, prefill", [("llama", False, "merged", "all"),
                                                      ("qwen2", True, "merged", "last_half"),
                                                      ("llama", False, "reference", "all")])
@pytest.mark.parametrize("plan", ["grid", "greedy"])
def test_larosa_search_plans_in_one_walk_match_the_staged_search(tokenizer, kind, tie, mode, prefill, plan):
    model, tok = tiny_model(kind, layers=3, tie=tie, tokenizer=tokenizer)
    samples = text_samples(tok, n=6, seqlen=40)
    opts = {"plan": plan, "mode": mode, "prefill": prefill}
    a, da, b, db = _both(model, lambda m, ad, s: larosa(m, ad, s, 0.5, progress=False, **opts),
                         {"method": "larosa", "sparsity": 0.5, **opts}, samples)
    assert da == db
    _same_model(a, b)
    if plan == "grid":
        nll = da["grid"]
        assert len(set(nll.values())) > 1  # the candidates differ: the choice means something
        assert da["calibration_nll"] == min(nll.values())
        if kind == "qwen2":  # picks 0.65 here: the layers were written with the last candidate's K (1.10)
            assert f"{da['ratio_in']:.2f}" != max(nll)
    assert len(set(_keeps(module_specs(b)))) > 2


def _keeps(specs):
    for s in specs.values():
        if "keep" in s:
            yield s["keep"]
        yield from _keeps(s.get("inner", {}))


@pytest.mark.parametrize("prefill", ["all", "none"])
def test_wina_greedy_in_one_walk_matches_the_staged_search(tokenizer, prefill):
    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer)
    samples = text_samples(tok, n=5, seqlen=40)
    a, da, b, db = _both(model, lambda m, ad, s: wina(m, ad, s, 0.4, plan="greedy", prefill=prefill, progress=False),
                         {"method": "wina", "sparsity": 0.4, "plan": "greedy", "prefill": prefill}, samples)
    assert da == db
    _same_model(a, b)


@pytest.mark.parametrize("method, plan", [("larosa", "grid"), ("larosa", "greedy"), ("wina", "greedy")])
def test_streamed_search_holds_one_layer(tmp_path, calib_text, monkeypatch, method, plan):
    """Streamed, the search chains run through decoder layer i while every other layer is on the meta
    device (the one-layer memory bound of the walk); the head is read for the grid's losses only after
    the last layer."""
    from mmcompress.cli import main
    from mmcompress.sparse import plan as plans

    from .tiny_models import save_tiny

    src = save_tiny(tmp_path / "model", "llama", layers=3)
    seen = []
    real = plans.SearchChain.outputs

    def spy(self, ctx):
        layers = list(ctx.adapter.layers)
        seen.append((ctx.index, [all(p.is_meta for p in other.parameters()) for k, other in enumerate(layers)
                                 if k != ctx.index], any(p.is_meta for p in ctx.layer.parameters())))
        return real(self, ctx)

    monkeypatch.setattr(plans.SearchChain, "outputs", spy)
    assert main(["sparsify", str(src), "--method", method, "--sparsity", "0.5", "--plan", plan, "--calib",
                 str(calib_text), "--nsamples", "3", "--seqlen", "24", "--no-progress", "--stream",
                 "--output", str(tmp_path / "out")]) == 0
    assert sorted({i for i, _, _ in seen}) == [0, 1, 2]
    for i, others, current_meta in seen:
        assert all(others) and not current_meta, i
