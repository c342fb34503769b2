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
