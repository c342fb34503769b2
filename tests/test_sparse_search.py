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


@pytest.mark.parametrize("kind, tie, prefill, column_scale", [("llama", False, "all", False),
                                                              ("qwen2", True, "last_half", True)])
@pytest.mark.parametrize("plan", ["exact", "grid", "greedy"])
def test_larosa_basis_both_in_one_walk_matches_the_rotation_walk_first(tokenizer, kind, tie, prefill, column_scale,
                                                                       plan):
    """Merged mode with ``basis="both"``: the one walk holds layer l until layer l+1's pass has given Q_{l+1}
    (``lookahead``), and gives what the staged path gives (a rotation walk over the dense model, then the
    merge of every layer, then the plan)."""
    model, tok = tiny_model(kind, layers=3, tie=tie, tokenizer=tokenizer)
    samples = text_samples(tok, n=6, seqlen=40)
    opts = {"plan": plan, "mode": "merged", "basis": "both", "prefill": prefill, "column_scale": column_scale}
    a, da, b, db = _both(model, lambda m, ad, s: larosa(m, ad, s, 0.5, progress=False, **opts),
                         {"method": "larosa", "sparsity": 0.5, **opts}, samples)
    assert make_sparse_method("larosa", sparsity=0.5, **opts).layer_method().lookahead
    assert da == db and da["basis"] == "both"
    _same_model(a, b)
    # basis "both" is not basis "attn": the rotations (hence the weights) differ
    c = copy.deepcopy(model)
    larosa(c, get_adapter(c), samples, 0.5, progress=False, **{**opts, "basis": "attn"})
    k = next(k for k in c.state_dict() if k.endswith("layers.1.layer.self_attn.q_proj.weight"))
    assert not torch.equal(c.state_dict()[k], b.state_dict()[k])


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


def test_streamed_basis_both_holds_two_layers(tmp_path, calib_text, monkeypatch):
    """Streamed LaRoSA merged with ``--basis both``: when decoder layer i is read, layer i-1 alone is still in
    memory (unwritten until layer i's pass gives Q_i), every other layer is on the meta device."""
    from mmcompress.cli import main
    from mmcompress.streaming import LayerStream

    from .tiny_models import save_tiny

    src = save_tiny(tmp_path / "model", "llama", layers=4)
    seen = []
    real = LayerStream.load_layer

    def spy(self, i, layer):
        seen.append((i, [k for k, other in enumerate(self.adapter.layers)
                         if not all(p.is_meta for p in other.parameters())]))
        return real(self, i, layer)

    monkeypatch.setattr(LayerStream, "load_layer", spy)
    assert main(["sparsify", str(src), "--method", "larosa", "--sparsity", "0.5", "--basis", "both", "--plan", "grid",
                 "--calib", str(calib_text), "--nsamples", "3", "--seqlen", "24", "--no-progress", "--stream",
                 "--output", str(tmp_path / "out")]) == 0
    assert seen == [(0, []), (1, [0]), (2, [1]), (3, [2])]
