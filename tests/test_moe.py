"""Qwen3-Omni-MoE thinker end to end on a tiny random model (4 experts, top-2; no download): the fused
experts split into per-expert linears, RTN / SmoothQuant / AWQ / MASQuant with image and audio tokens
routed (to the experts too), save -> load with identical logits, compressed-tensors export, generation
with modality routing, and the refusals (sparsity, streamed weights).  See docs/moe.md."""

import copy

import pytest
import torch

import mmcompress
from mmcompress.models.adapters import UnsupportedModelError, get_adapter
from mmcompress.models.modality import AUDIO, IMAGE, TEXT, current_modality_ids
from mmcompress.models.moe import ExpertLinears
from .tiny_models import tiny_model
from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.quantizer import QuantScheme, quantize_weight

from ._families import calibration, family_inputs
from .test_families import _logits, _sqnr

KIND = "qwen3_omni_moe"


@pytest.fixture
def model(tokenizer):
    return tiny_model(KIND, tokenizer=tokenizer)[0]


def _experts(adapter, i=0) -> ExpertLinears:
    return adapter.layers[i].mlp.experts


def test_unfusing_preserves_the_model_and_narrows_modality_ids(model, tokenizer):
    x = family_inputs(KIND, tokenizer, seed=7)
    fused = model.get_submodule("model.language_model.layers.0.mlp.experts")
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    ref = _logits(model, x)  # transformers' own experts implementation (grouped_mm)
    adapter = get_adapter(model)
    experts = _experts(adapter)
    assert isinstance(experts, ExpertLinears) and len(experts) == 4
    inter = gate_up.shape[1] // 2
    assert torch.equal(experts[2].gate_proj.weight, gate_up[2, :inter])
    assert torch.equal(experts[2].up_proj.weight, gate_up[2, inter:])
    assert torch.equal(experts[2].down_proj.weight, down[2])
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-5, atol=1e-5)
    get_adapter(model)  # idempotent
    assert _experts(get_adapter(model)) is experts
    # inside the loop each expert sees the modality ids of exactly the tokens routed to it
    seen = {IMAGE: 0, AUDIO: 0, TEXT: 0}
    sizes = []

    def hook(mod, args):
        ids = current_modality_ids()
        assert ids is not None and ids.shape == args[0].shape[:-1]
        sizes.append(args[0].shape[0])
        for m in seen:
            seen[m] += int((ids == m).sum())

    handles = [e.gate_proj.register_forward_pre_hook(hook) for e in experts]
    router = adapter.install_router()  # noqa: F841 - modality ids during the forward, as after compression
    try:
        _logits(model, x)
    finally:
        for h in handles:
            h.remove()
    n_tokens = x["input_ids"].shape[1]
    assert sum(sizes) == 2 * n_tokens  # top-2: every token reaches two experts
    assert seen[IMAGE] == 2 * 4 and seen[AUDIO] == 2 * 5


def test_rtn_quantizes_each_expert_and_keeps_the_router(model, tokenizer, tmp_path):
    x = family_inputs(KIND, tokenizer, seed=7)
    ref = _logits(model, x)
    adapter = get_adapter(model)
    router = adapter.layers[0].mlp.gate.weight.detach().clone()
    gate_up = torch.cat([_experts(adapter)[1].gate_proj.weight, _experts(adapter)[1].up_proj.weight]).detach().clone()
    mmcompress.quantize(model, calibration(KIND, tokenizer), "rtn", "w4a16", progress=False)
    n = sum(len(adapter.linear_names(i)) for i in range(len(adapter.layers)))
    assert n == 2 * (4 + 4 * 3)
    assert sum(isinstance(m, QuantLinear) for m in adapter.layers.modules()) == n
    assert not isinstance(adapter.layers[0].mlp.gate, QuantLinear)
    assert torch.equal(adapter.layers[0].mlp.gate.weight, router)  # the router stays as it was
    # gate and up of one expert: their own step sizes, per output channel and group, as a [2I, H] matrix would get
    e1 = _experts(adapter)[1]
    codes, scale, zero = quantize_weight(gate_up.float(), 4, 128, False)
    inter = e1.gate_proj.out_features
    assert e1.gate_proj.weight_scale.shape == (inter, 1) and e1.down_proj.weight_scale.shape == (64, 1)
    torch.testing.assert_close(e1.gate_proj.weight_scale, scale[:inter].float())
    torch.testing.assert_close(e1.up_proj.weight_scale, scale[inter:].float())
    y = _logits(model, x)
    assert not torch.equal(y, ref) and _sqnr(y, ref) > 10
    art = mmcompress.save(model, tmp_path / "rtn")
    loaded = mmcompress.load(art, runtime="reference")  # built from the fused class, experts from the spec
    assert isinstance(_experts(get_adapter(loaded)), ExpertLinears)
    assert torch.equal(_logits(loaded, x), y)


def test_w8a8_export_and_integer_runtime(model, tokenizer, tmp_path):
    x = family_inputs(KIND, tokenizer, seed=7)
    mmcompress.quantize(model, calibration(KIND, tokenizer), "rtn", "w8a8", progress=False)
    y = _logits(model, x)
    art = mmcompress.save(model, tmp_path / "rtn")
    torch.testing.assert_close(_logits(mmcompress.load(art, runtime="int"), x), y, rtol=2e-2, atol=2e-2)
    from safetensors import safe_open

    from mmcompress.export.compressed_tensors import export_compressed_tensors

    rep = export_compressed_tensors(art, tmp_path / "ct")
    assert rep["codes_identical"] == rep["quantized_linears"] == 2 * (4 + 4 * 3)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale" in keys  # per-expert layout, checkpoint names
    assert "model.layers.1.mlp.gate.weight" in keys and "model.layers.1.mlp.gate.weight_scale" not in keys
    assert not any("gate_up_proj" in k for k in keys)


def test_smoothing_is_exact_through_the_router_and_per_expert(model, tokenizer):
    """At 16 bits SmoothQuant only rescales.  mlp_in: one vector folded into post_attention_layernorm,
    the router's columns multiplied by it (its logits, hence the routing, unchanged); mlp_out.<e>: expert
    e's own vector from the tokens routed to it, folded into its up_proj rows."""
    calib = calibration(KIND, tokenizer, n=3)
    x = family_inputs(KIND, tokenizer, seed=7)
    ref = _logits(model, x)
    adapter = get_adapter(model)
    router = adapter.layers[0].mlp.gate.weight.detach().clone()
    down = [e.down_proj.weight.detach().clone() for e in _experts(adapter)]
    # the down_proj inputs each expert sees, through the uncompressed model
    routed = {e: [] for e in range(4)}
    handles = [ex.down_proj.register_forward_pre_hook(lambda m, a, e=e: routed[e].append(a[0].detach().abs()))
               for e, ex in enumerate(_experts(adapter))]
    from mmcompress.engine import capture_inputs

    cap = capture_inputs(model, adapter, calib, progress=False)
    for j in range(len(calib)):
        adapter.layers[0](cap.hidden[j], **cap.layer_kwargs[j][0])
    for h in handles:
        h.remove()

    exact = copy.deepcopy(model)
    mmcompress.quantize(exact, calib, "smoothquant", QuantScheme(16, 16), progress=False,
                        groups=["attn_in", "attn_out", "mlp_in", "mlp_out"])
    torch.testing.assert_close(_logits(exact, x), ref, rtol=1e-4, atol=1e-4)
    placement = exact._mmcompress_description["layers"][0]["smoothing"]
    assert placement["mlp_in"] == "folded" and all(placement[f"mlp_out.{e}"] == "folded" for e in range(4))
    ex_adapter = get_adapter(exact)
    assert not torch.allclose(ex_adapter.layers[0].mlp.gate.weight, router)  # the router followed the fold
    from mmcompress.quant.methods.smoothquant import smoothing_factors

    for e, ex in enumerate(_experts(ex_adapter)):
        act = torch.cat([a.reshape(-1, a.shape[-1]) for a in routed[e]]).amax(0)
        want = smoothing_factors(act, down[e].abs().amax(0), 0.5)
        got = (ex.down_proj.weight.detach().double() / down[e].double())[0]  # down_proj's columns ⊙ s_e
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    quant = copy.deepcopy(model)
    mmcompress.quantize(quant, calib, "smoothquant", "w8a8", progress=False)
    assert _sqnr(_logits(quant, x), ref) > 20


def _never_expert_3(router, hidden_states):
    """The router's forward with expert 3 masked out of the top-k."""
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
    probs = torch.softmax(logits.masked_fill(torch.arange(logits.shape[-1]) == 3, float("-inf")), -1, dtype=torch.float)
    top, idx = torch.topk(probs, router.top_k, dim=-1)
    return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), idx


def test_an_expert_no_token_reaches_is_left_unscaled(model, tokenizer):
    import types

    adapter = get_adapter(model)
    for layer in adapter.layers:
        layer.mlp.gate.forward = types.MethodType(_never_expert_3, layer.mlp.gate)
    calib = calibration(KIND, tokenizer)
    for method in ("smoothquant", "awq"):
        m = copy.deepcopy(model)
        opts = {"groups": ["attn_in", "mlp_in", "mlp_out"]} if method == "smoothquant" else {"grid": 4}
        mmcompress.quantize(m, calib, method, "w8a8", progress=False, **opts)
        info = m._mmcompress_description["layers"][0]
        assert (info["smoothing"] if method == "smoothquant" else info["awq"]["alpha"])["mlp_out.3"] == "no tokens"


def test_masquant_routes_image_and_audio_to_the_experts_saves_and_generates(model, tokenizer, tmp_path):
    x = family_inputs(KIND, tokenizer, seed=7)
    ref = _logits(model, x)
    mmcompress.quantize(model, calibration(KIND, tokenizer), "masquant", "w4a8", progress=False, epochs=1)
    tokens = model._mmcompress_description["layers"][0]["masquant"]["tokens"]
    assert tokens["image"] == 2 * 4 and tokens["audio"] == 2 * 5
    adapter = get_adapter(model)
    from mmcompress.quant.methods.masquant import MASLinear

    gate = _experts(adapter)[0].gate_proj
    assert isinstance(gate, MASLinear) and gate.input_smoothing.shape[0] == 3 and gate.rank > 0
    assert not torch.equal(gate.input_smoothing[IMAGE], gate.input_smoothing[TEXT])
    assert not isinstance(adapter.layers[0].mlp.gate, QuantLinear)
    y = _logits(model, x)
    assert _sqnr(y, ref) > 5
    loaded = mmcompress.load(mmcompress.save(model, tmp_path / "mas"), runtime="reference")
    assert torch.equal(_logits(loaded, x), y)

    # generation: in the prefill the experts see the image and audio positions routed to them; decode is text
    seen = []
    handles = [e.gate_proj.register_forward_pre_hook(lambda m, a: seen.append(current_modality_ids()))
               for e in _experts(get_adapter(loaded))]
    try:
        out = loaded.generate(**x, max_new_tokens=3, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    assert out.shape[1] == x["input_ids"].shape[1] + 3
    prefill_calls = [ids for ids in seen if ids is not None and ids.numel() and bool((ids != TEXT).any())]
    assert sum(int((ids == IMAGE).sum()) for ids in prefill_calls) == 2 * 4
    assert sum(int((ids == AUDIO).sum()) for ids in prefill_calls) == 2 * 5
    decode = seen[-2:]  # the last decode step reaches at least one expert with its single token
    assert all(ids is None or bool((ids == TEXT).all()) for ids in decode)


@pytest.mark.parametrize("method", ["larosa", "wina", "teal", "cats"])
def test_sparsity_is_refused_with_the_reason(model, tokenizer, method):
    with pytest.raises(UnsupportedModelError, match=r"qwen3_omni_moe_thinker: .*(per-expert|own rotation)"):
        mmcompress.sparsify(model, calibration(KIND, tokenizer), method, 0.4, progress=False)


def test_meta_weights_are_refused(tokenizer):
    from accelerate import init_empty_weights

    config = tiny_model(KIND, tokenizer=tokenizer)[0].config
    import transformers

    with init_empty_weights():
        meta = transformers.Qwen3OmniMoeThinkerForConditionalGeneration(config)
    with pytest.raises(UnsupportedModelError, match="load the model in memory"):
        get_adapter(meta)


def test_diagnostics_measure_each_expert_on_its_routed_tokens(model, tokenizer, tmp_path):
    import json

    mmcompress.quantize(model, calibration(KIND, tokenizer), "rtn", "w8a8", progress=False, report_dir=tmp_path)
    report = json.loads((tmp_path / "diagnostics-rtn-w8a8.json").read_text())
    linears = report["layers"][0]["linears"]
    experts = [linears[f"mlp.experts.{e}.down_proj"] for e in range(4) if f"mlp.experts.{e}.down_proj" in linears]
    assert len(experts) == 4
    assert any("image" in e["sqnr"] for e in experts) and any("audio" in e["sqnr"] for e in experts)


def test_checkpoint_resume_rebuilds_the_experts(model, tokenizer, tmp_path):
    calib = calibration(KIND, tokenizer)
    x = family_inputs(KIND, tokenizer, seed=7)
    first = copy.deepcopy(model)
    mmcompress.quantize(first, calib, "smoothquant", "w8a8", checkpoint_dir=tmp_path / "ck", progress=False)
    again = copy.deepcopy(model)  # every layer is restored from its checkpoint file
    mmcompress.quantize(again, calib, "smoothquant", "w8a8", checkpoint_dir=tmp_path / "ck", resume=True,
                        progress=False)
    assert isinstance(_experts(get_adapter(again), 1)[0].down_proj, QuantLinear)
    assert torch.equal(_logits(again, x), _logits(first, x))


def test_masquant_export_folds_into_the_norm_and_the_router_follows(model, tokenizer, tmp_path):
    """The compressed-tensors text path folds MASQuant's run-time text smoothing into post_attention_layernorm;
    the router reads that norm too, so its columns must carry the same vector: W_r ⊙ γ is unchanged."""
    from safetensors import safe_open

    from mmcompress.export.compressed_tensors import export_compressed_tensors

    adapter = get_adapter(model)
    before = [(layer.mlp.gate.weight * layer.post_attention_layernorm.weight).detach().clone()
              for layer in adapter.layers]
    mmcompress.quantize(model, calibration(KIND, tokenizer), "masquant", "w8a8", progress=False, epochs=1)
    art = mmcompress.save(model, tmp_path / "mas")
    rep = export_compressed_tensors(art, tmp_path / "ct", requantize=True)  # untied per-expert vectors: inexact
    assert "text path only" in rep["moe_experts"]
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        for i, ref in enumerate(before):
            router = f.get_tensor(f"model.layers.{i}.mlp.gate.weight").double()
            gamma = f.get_tensor(f"model.layers.{i}.post_attention_layernorm.weight").double()
            assert not torch.allclose(router, ref.double())  # the fold moved the scale ...
            torch.testing.assert_close(router * gamma, ref.double(), rtol=1e-5, atol=1e-7)  # ... the logits stay
