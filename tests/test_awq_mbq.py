import copy

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.quant.methods.awq import AWQ
from mmcompress.quant.methods.mbq import MBQ
from mmcompress.quant.quantizer import resolve_scheme

from .conftest import mm_inputs, text_samples, tiny_model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _outlier_llama(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("input_layernorm.weight") or name.endswith("post_attention_layernorm.weight"):
                p[:4] *= 30
    return model, tok


@pytest.mark.parametrize("method,scheme", [("awq", "w4a16"), ("mbq", "w4a8")])
def test_scale_search_beats_rtn_with_outlier_channels(tokenizer, method, scheme):
    model, tok = _outlier_llama(tokenizer)
    calib = CalibrationSet(text_samples(tok, n=4, seqlen=48))
    x = {"input_ids": torch.randint(0, len(tok) - 10, (1, 40), generator=torch.Generator().manual_seed(5))}
    ref = model(**x).logits
    errs = {}
    for name in ("rtn", method):
        m = copy.deepcopy(model)
        mmcompress.quantize(m, calib, name, scheme, progress=False)
        errs[name] = _rel(m(**x).logits, ref)
        if name != "rtn":
            alphas = m._mmcompress_description["layers"][0][name]["alpha"]
            assert set(alphas) >= {"attn_in", "mlp_in"}
    assert errs[method] < errs["rtn"], errs


def test_awq_grid_zero_is_rtn(tokenizer):
    """α = 0 gives s = 1: the search can never do worse than RTN on its own objective."""
    search = AWQ(resolve_scheme("w4a16"))
    s = search.candidate(torch.rand(16) + 0.1, torch.rand(16), torch.rand(16), 0.0)
    assert torch.allclose(s, torch.ones(16, dtype=s.dtype))


def test_mbq_weights_tokens_by_modality(tokenizer):
    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    calib = [mm_inputs("qwen2_5_omni", tok, seed=s)[0] for s in range(2)]
    m = copy.deepcopy(model)
    mmcompress.quantize(m, CalibrationSet(calib), "mbq", "w4a8", progress=False)
    lw = m._mmcompress_description["method_summary"]["loss_weights"]
    assert lw["text"] == 1.0 and lw["image"] > 0 and lw["audio"] > 0
    search = MBQ(resolve_scheme("w4a8"), loss_weights={"image": 3.0})
    search.loss_weights = {0: 1.0, 1: 3.0}
    w = search.token_weights(torch.tensor([0, 1, 1, 2]))
    assert w.tolist() == [1.0, 3.0, 3.0, 1.0]


def test_loss_weights_have_one_definition(tokenizer, monkeypatch):
    """MBQ and MASQuant resolve ``loss_weights`` with one function (quant/methods/gradients.py); MBQ no
    longer imports MASQuant; ``auto`` probes gradients only where the calibration set has image/audio."""
    from mmcompress.models.adapters import get_adapter
    from mmcompress.models.modality import AUDIO, IMAGE, TEXT
    from mmcompress.quant.methods import gradients
    from mmcompress.quant.methods.masquant import MASQuant

    from .test_import_graph import import_graph

    graph = import_graph()
    assert "mmcompress.quant.methods.masquant" not in graph["mmcompress.quant.methods.mbq"]
    assert "mmcompress.quant.methods.gradients" in graph["mmcompress.quant.methods.mbq"]
    mm, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    text, adapter = text_samples(tok, n=2), get_adapter(mm)
    probes = []
    monkeypatch.setattr(gradients, "modality_gradient_ratios",
                        lambda model, adapter, samples: probes.append(len(samples)) or {IMAGE: 0.25, AUDIO: 0.5})
    resolve = gradients.resolve_loss_weights
    assert resolve({"image": 2, "text": 3}, mm, adapter, text, 16) == ({TEXT: 3.0, IMAGE: 2.0}, None)
    assert resolve("scripted", mm, adapter, text, 16) == ({TEXT: 1.0, IMAGE: 0.5, AUDIO: 1.0}, None)
    assert resolve("auto", mm, adapter, text, 16) == ({TEXT: 1.0}, None) and probes == []  # text-only: no probe
    calib = [mm_inputs("qwen2_5_omni", tok, seed=s)[0] for s in range(3)]
    assert resolve("auto", mm, adapter, calib, 2) == ({TEXT: 1.0, IMAGE: 0.25, AUDIO: 0.5},
                                                      {IMAGE: 0.25, AUDIO: 0.5}) and probes == [2]
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        MBQ(resolve_scheme("w4a8"), loss_weights={"smell": 1.0})
    for cls in (MBQ, MASQuant):  # the same option, resolved the same way (MASQuant fills absent ones with 1)
        m = cls(resolve_scheme("w4a8"), loss_weights="auto", probe_samples=2)
        m.prepare(mm, adapter, calib)
        assert {k: m.loss_weights[k] for k in (TEXT, IMAGE, AUDIO)} == {TEXT: 1.0, IMAGE: 0.25, AUDIO: 0.5}
    assert probes == [2, 2, 2]


def test_recipe_walks_again_before_a_gradient_probe(tokenizer):
    """An MBQ step with ``loss_weights: auto`` on a multimodal model probes gradients through the whole
    model in its prepare(): it must see the model the steps before it left, so it starts a new walk (and a
    streamed run refuses it).  Given weights share the walk."""
    from mmcompress.models.adapters import get_adapter
    from mmcompress.quant.api import make_method, whole_model_prepare
    from mmcompress.recipe import apply_recipe, parse_recipe

    model, tok = tiny_model("qwen2_5_vl", tokenizer=tokenizer)
    adapter = get_adapter(model)
    assert whole_model_prepare(make_method("mbq", resolve_scheme("w4a8")), adapter)
    assert not whole_model_prepare(make_method("mbq", resolve_scheme("w4a8"), loss_weights="scripted"), adapter)
    assert not whole_model_prepare(make_method("rtn", resolve_scheme("w8a8")), adapter)
    calib = CalibrationSet([mm_inputs("qwen2_5_vl", tok, seed=s)[0] for s in range(2)])
    for weights, walks in (("auto", [[1], [2]]), ("scripted", [[1, 2]])):
        m = copy.deepcopy(model)
        apply_recipe(m, calib, parse_recipe({"steps": [
            {"sparsify": {"method": "teal", "sparsity": 0.3}},
            {"quantize": {"method": "mbq", "scheme": "w4a8", "grid": 2, "loss_weights": weights}}]}), progress=False)
        assert [w["steps"] for w in m._mmcompress_description["walks"]] == walks, weights
