"""TEAL and CATS: realised sparsity on the calibration data equals the plan; CATS caps unreachable targets."""

import pytest
import torch

from mmcompress.sparse.api import measure_sparsity, sparsify

from .conftest import text_samples, tiny_model


@pytest.mark.parametrize("method,target", [("teal", 0.4), ("cats", 0.3)])
def test_measured_sparsity_matches_plan_on_calibration_data(tokenizer, method, target):
    model, tok = tiny_model("llama", tokenizer=tokenizer, layers=2)
    samples = text_samples(tok, n=4, seqlen=64)
    sparsify(model, samples, method, target, progress=False)
    planned = model._mmcompress_description["method"]["model_sparsity"]
    assert planned == pytest.approx(target, abs=1e-6)
    assert measure_sparsity(model, samples)["model_sparsity"] == pytest.approx(planned, abs=0.01)


def test_cats_cannot_reach_high_sparsity(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer, layers=2)
    samples = text_samples(tok)
    sparsify(model, samples, "cats", 0.6, progress=False)
    info = model._mmcompress_description["method"]
    # only up and down count: at most 0.99 * (|up| + |down|) / block mass
    assert info["model_sparsity"] == pytest.approx(info["max_model_sparsity"]) and info["model_sparsity"] < 0.6
    assert "cannot reach" in info["note"] or "above what CATS can reach" in info["note"]


def test_teal_half_prefill_sparsifies_only_the_second_half(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer, layers=2)
    samples = text_samples(tok, n=2, seqlen=64)
    sparsify(model, samples, "teal", 0.5, prefill="last_half", progress=False)
    m = measure_sparsity(model, samples)["model_sparsity"]
    assert m == pytest.approx(0.25, abs=0.03)
    x = torch.randint(0, len(tok) - 10, (1, 1))  # a decode step is fully sparse
    q = model.model.layers[0].self_attn.q_proj
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(x))
    assert float((q.sparsify(h) == 0).float().mean()) > 0.2


def test_teal_greedy_reaches_target_per_layer_and_beats_uniform_on_layer_error(tokenizer):
    """Greedy allocation: every layer ends at the target parameter-weighted sparsity (exactly, up to the
    quantile grid), the split across matrices is not uniform, the realised sparsity on the calibration
    data matches, and the model output is no worse than the uniform allocation's."""
    model, tok = tiny_model("llama", tokenizer=tokenizer, layers=2)
    samples = text_samples(tok, n=4, seqlen=64)
    ref = model(**samples[0]).logits
    import copy

    uni = copy.deepcopy(model)
    sparsify(uni, samples, "teal", 0.4, progress=False)
    sparsify(model, samples, "teal", 0.4, plan="greedy", progress=False)
    info = model._mmcompress_description["method"]
    assert info["plan"] == "greedy" and info["model_sparsity"] == pytest.approx(0.4, abs=1e-6)
    levels = info["levels"]
    assert any(abs(v - 0.4) > 0.02 for lv in levels.values() for v in lv)  # a non-uniform split
    assert measure_sparsity(model, samples)["model_sparsity"] == pytest.approx(0.4, abs=0.03)
    err_greedy = (model(**samples[0]).logits - ref).pow(2).mean()
    err_uniform = (uni(**samples[0]).logits - ref).pow(2).mean()
    assert err_greedy <= err_uniform * 1.05


def test_teal_greedy_rejected_for_other_methods(tiny_llama_dir, calib_text, tmp_path):
    from mmcompress.cli import main

    rc = main(["sparsify", str(tiny_llama_dir), "--method", "cats", "--sparsity", "0.4", "--plan", "greedy",
               "--calib", str(calib_text), "--output", str(tmp_path / "o")])
    assert rc == 1 and not (tmp_path / "o").exists()


def test_larosa_greedy_plan_hits_the_target_with_uneven_levels(tokenizer):
    """LaRoSA + TEAL's greedy search over the four Top-K levels per layer (our extension): the achieved
    model-level sparsity is the target up to one move, realised sparsity equals the plan (Top-K), the
    levels differ across activations, and the model is not worse than the exact plan by much."""
    import copy

    model, tok = tiny_model("llama", tokenizer=tokenizer, layers=2)
    samples = text_samples(tok, n=4, seqlen=64)
    ref = model(**samples[0]).logits
    exact = copy.deepcopy(model)
    sparsify(exact, samples, "larosa", 0.4, progress=False)
    sparsify(model, samples, "larosa", 0.4, plan="greedy", progress=False)
    info = model._mmcompress_description["method"]
    assert info["plan"] == "greedy" and 0.4 <= info["model_sparsity"] < 0.42
    assert measure_sparsity(model, samples)["model_sparsity"] == pytest.approx(info["model_sparsity"], abs=1e-3)
    assert len({round(v, 3) for lv in info["levels"].values() for v in lv}) > 2
    e_greedy = (model(**samples[0]).logits - ref).pow(2).mean()
    e_exact = (exact(**samples[0]).logits - ref).pow(2).mean()
    assert e_greedy <= 1.5 * e_exact


@pytest.mark.parametrize("n", [1, 7, 1000, 1 << 18])
def test_quantile_selects_the_element_a_sort_would_index(n):
    """``quantile`` (a selection, for one level) and ``quantile(is_sorted=True)`` (an index into the sorted
    sample, for TEAL greedy's many levels) give the same threshold: ties, inf and NaN included."""
    from mmcompress.sparse.methods.teal import quantile

    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=g).abs()
    v[::3] = v[0]  # ties
    if n > 5:
        v[2], v[5] = float("inf"), float("nan")
    s = torch.sort(v).values
    same = lambda a, b: a == b or (a != a and b != b)  # noqa: E731  (NaN sorts last: the top level's)
    for level in (0.0, 1e-4, 0.3, 0.4, 0.5, 0.99, 0.9999, 1.0):
        a, b = quantile(v, level), quantile(s, level, is_sorted=True)
        assert same(a, b), (level, a, b)
        assert same(b, float(s[min(n - 1, int(level * n))]) if level > 0 else 0.0)


@pytest.mark.parametrize("method", ["larosa", "teal"])
def test_measure_sparsity_selects_once_per_projection_call(tokenizer, monkeypatch, method):
    """``measure_sparsity`` counts the zeros of the input each projection's forward sparsifies, without
    selecting a second time (a Top-K on every prefill token is most of the measurement)."""
    from mmcompress.sparse.linear import SparseLinear, sparse_linears

    model, tok = tiny_model("llama", tokenizer=tokenizer, layers=2)
    samples = text_samples(tok, n=2, seqlen=48)
    sparsify(model, samples, method, 0.4, progress=False)
    calls = []
    real = SparseLinear.sparsify
    monkeypatch.setattr(SparseLinear, "sparsify", lambda self, x: (calls.append(1), real(self, x))[1])
    got = measure_sparsity(model, samples)
    assert len(calls) == len(sparse_linears(model)) * len(samples)
    planned = model._mmcompress_description["method"]["model_sparsity"]
    assert got["model_sparsity"] == pytest.approx(planned, abs=1e-3 if method == "larosa" else 0.05)
    assert "sparsify" not in vars(sparse_linears(model)[0])  # the counting wrapper is gone
