"""Every family of issue 18 end to end on a tiny random model (no download): RTN (and its
compressed-tensors export), SmoothQuant and MASQuant with image tokens routed, save -> load with
identical logits, LaRoSA (merged where the norms allow, reference otherwise; hybrid Qwen3.5 decoders
merged too: Gated-DeltaNet readers and writers rotate like attention's), generation with modality routing.

Run one family with ``-k <kind>``.
"""

import copy

import pytest
import torch

import mmcompress
from mmcompress.models.adapters import get_adapter
from mmcompress.models.modality import IMAGE, TEXT, current_modality_ids
from .tiny_models import tiny_model
from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.quantizer import QuantScheme

from ._families import calibration, family_inputs

KINDS = ["qwen3", "gemma3_vl", "idefics3", "smolvlm", "qwen3_vl", "qwen3_5", "qwen3_5_vl", "minicpmv4_6",
         "minicpmv4_7"]
MULTIMODAL = {"gemma3_vl", "idefics3", "smolvlm", "qwen3_vl", "qwen3_5_vl", "minicpmv4_6", "minicpmv4_7"}
# LaRoSA: merged where the norms allow; reference for sandwich norms (Gemma3) and deepstack (Qwen3-VL).
LAROSA_MODE = {"qwen3": "merged", "gemma3_vl": "reference", "idefics3": "merged", "smolvlm": "merged",
               "qwen3_vl": "reference", "qwen3_5": "merged", "qwen3_5_vl": "merged", "minicpmv4_6": "merged",
               "minicpmv4_7": "merged"}


def _model(kind, tok):
    return tiny_model(kind, tokenizer=tok)[0]


@torch.no_grad()
def _logits(model, x):
    return model(**x, use_cache=False).logits.float()


def _sqnr(y, ref):
    return float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum().clamp(min=1e-30)))


def _n_linears(adapter):
    return sum(len(adapter.linear_names(i)) for i in range(len(adapter.layers)))


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_quantizes_every_decoder_linear_and_round_trips(kind, tokenizer, tmp_path):
    model = _model(kind, tokenizer)
    x = family_inputs(kind, tokenizer, seed=7)
    ref = _logits(model, x)
    mmcompress.quantize(model, calibration(kind, tokenizer), "rtn", "w8a8", progress=False)
    adapter = get_adapter(model)
    assert sum(isinstance(m, QuantLinear) for m in adapter.layers.modules()) == _n_linears(adapter)
    y = _logits(model, x)
    assert not torch.equal(y, ref) and _sqnr(y, ref) > 20
    art = mmcompress.save(model, tmp_path / "rtn")
    loaded = mmcompress.load(art, runtime="reference")  # the fake-quant form: identical logits
    assert torch.equal(_logits(loaded, x), y)
    from mmcompress.export.compressed_tensors import export_compressed_tensors

    rep = export_compressed_tensors(art, tmp_path / "ct")  # w8a8: the stored integer codes, unchanged
    assert rep["codes_identical"] == rep["quantized_linears"] == _n_linears(adapter)


@pytest.mark.parametrize("kind", KINDS)
def test_smoothing_is_exact_and_smoothquant_runs(kind, tokenizer):
    """At 16 bits SmoothQuant only rescales: folded (and run-time) smoothing must leave the logits as
    they were, which checks every producer -> reader group (incl. Qwen3's q_norm/k_norm after q/k_proj,
    Qwen3.5's gated attention and Gated-DeltaNet groups)."""
    model = _model(kind, tokenizer)
    calib = calibration(kind, tokenizer)
    x = family_inputs(kind, tokenizer, seed=7)
    ref = _logits(model, x)
    exact = copy.deepcopy(model)
    mmcompress.quantize(exact, calib, "smoothquant", QuantScheme(16, 16), progress=False, runtime_smoothing=True)
    torch.testing.assert_close(_logits(exact, x), ref, rtol=1e-4, atol=1e-4)
    placements = [info["smoothing"] for info in exact._mmcompress_description["layers"]]
    assert all(p["attn_in"] == "folded" and p["mlp_in"] == "folded" for p in placements)
    mmcompress.quantize(model, calib, "smoothquant", "w8a8", progress=False)
    y = _logits(model, x)
    assert _sqnr(y, ref) > 20


@pytest.mark.parametrize("kind", KINDS)
def test_masquant_routes_images_saves_and_generates(kind, tokenizer, tmp_path):
    model = _model(kind, tokenizer)
    x = family_inputs(kind, tokenizer, seed=7)
    ref = _logits(model, x)
    mmcompress.quantize(model, calibration(kind, tokenizer), "masquant", "w4a8", progress=False, epochs=1)
    desc = model._mmcompress_description
    counts = desc["calibration"]["tokens"] if "tokens" in desc["calibration"] else desc["calibration"]
    image_tokens = int((x["input_ids"] == get_adapter(model).modality_token_ids.get("image", -1)).sum())
    if kind in MULTIMODAL:
        assert image_tokens == 4 and "image" in str(counts)
        assert getattr(model, "_mmcompress_router", None) is not None
    y = _logits(model, x)
    assert _sqnr(y, ref) > 5
    loaded = mmcompress.load(mmcompress.save(model, tmp_path / "mas"), runtime="reference")
    assert torch.equal(_logits(loaded, x), y)

    # generation: the prefill routes the image positions, every decode step is text
    seen = []
    first = loaded.get_submodule(get_adapter(loaded).layer_prefix(0)).mlp.gate_proj
    handle = first.register_forward_pre_hook(lambda m, a: seen.append(current_modality_ids()))
    try:
        out = loaded.generate(**x, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert out.shape[1] == x["input_ids"].shape[1] + 3
    prefill, decode = seen[0], seen[1:]
    assert len(decode) == 2
    if kind in MULTIMODAL:
        assert int((prefill == IMAGE).sum()) == image_tokens
    for ids in decode:
        assert ids is None or bool((ids == TEXT).all())


@pytest.mark.parametrize("kind", KINDS)
def test_larosa(kind, tokenizer, tmp_path):
    mode = LAROSA_MODE[kind]
    model = _model(kind, tokenizer)
    calib = calibration(kind, tokenizer)
    x = family_inputs(kind, tokenizer, seed=7)
    if mode == "reference":
        with pytest.raises(NotImplementedError, match="merged mode is not supported"):
            mmcompress.sparsify(copy.deepcopy(model), calib, "larosa", 0.4, progress=False)
    ref = _logits(model, x)
    dense = mmcompress.sparsify(copy.deepcopy(model), calib, "larosa", 0.0, mode=mode, progress=False)
    torch.testing.assert_close(_logits(dense, x), ref, rtol=1e-3, atol=1e-3)  # rotations alone are exact
    mmcompress.sparsify(model, calib, "larosa", 0.4, mode=mode, progress=False)
    from mmcompress.sparse.api import measure_sparsity

    got = measure_sparsity(model, [x])["model_sparsity"]
    assert abs(got - 0.4) < 0.03
    y = _logits(model, x)
    assert torch.isfinite(y).all() and _sqnr(y, ref) > 0
    loaded = mmcompress.load(mmcompress.save(model, tmp_path / "larosa"), runtime="reference")
    assert torch.equal(_logits(loaded, x), y)


@torch.no_grad()
def test_qwen3_vl_deepstack_is_carried_through_the_layerwise_chain(tokenizer):
    """Qwen3-VL adds deepstack visual features after its first decoder layers: the engine captures
    them, and the layer-by-layer chain with them reproduces the model (without them it does not)."""
    from mmcompress.engine import capture_inputs

    model = _model("qwen3_vl", tokenizer)
    x = family_inputs("qwen3_vl", tokenizer, seed=3)
    adapter = get_adapter(model)
    cap = capture_inputs(model, adapter, [x], progress=False)
    assert sorted(cap.injections[0]) == [0, 1]  # deepstack_visual_indexes has two entries
    image = (x["input_ids"] == adapter.modality_token_ids["image"])[0]
    for delta in cap.injections[0].values():
        assert bool(delta[0, ~image].eq(0).all()) and bool(delta[0, image].ne(0).any())
    ref = _logits(model, x)

    def chain(inject):
        h = cap.hidden[0]
        for i, layer in enumerate(adapter.layers):
            out = layer(h, **cap.layer_kwargs[0][i])
            h = out[0] if isinstance(out, tuple) else out
            if inject:
                h = cap.after_layer(0, i, h)
        return model.lm_head(adapter.final_norm(h)).float()

    torch.testing.assert_close(chain(True), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(chain(False), ref, rtol=1e-3, atol=1e-3)
