"""compressed-tensors export: pre-flight refusals, exact folds, code identity and reload round trips.

Round trips compare against ``mmcompress.load(artifact)`` on the same token ids:

* Every reload is ``AutoModelForCausalLM.from_pretrained(dir)`` exactly as a user types it (no
  ``quantization_config`` argument): asymmetric pack-quantized exports carry the loading attribute
  ``dequantize: true`` in their config because transformers' compressed route cannot size packed zero
  points (compressed-tensors <= 0.20; the same failure hits llm-compressor's W4A16_ASYM checkpoints).
* W4A16 (weight-only): the same logits (relative error < 1e-3; exact folds give ~1e-7).
* W8A8: transformers applies compressed-tensors' own dynamic per-token int8 fake quantization
  (scale ``absmax/127.5``, range [-128, 127]), while mmcompress, like vLLM's ``scaled_int8_quant``,
  uses ``absmax/127`` and [-127, 127].  So the test checks (1) the decompressed weights equal ours,
  (2) logits with activation quantization off on both sides, (3) logits with our activation grid
  switched to compressed-tensors' convention — both < 1e-3 relative.
"""

import dataclasses
import json

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.quant.linear import QuantLinear

from .conftest import text_samples, tiny_model

pytest.importorskip("compressed_tensors")

from mmcompress.export.compressed_tensors import (  # noqa: E402
    ExportError, export_compressed_tensors, kernel_table, preflight, read_export_config)


_CACHE = {}


def _artifact(root, tokenizer, method, scheme, kv_heads=4, kind="llama", **opts):
    """A saved tiny artifact; identical requests within the module share one (read-only) artifact."""
    from mmcompress.quant.quantizer import resolve_scheme

    scheme = resolve_scheme(scheme) if isinstance(scheme, str) else scheme
    key = (method, scheme.name, kv_heads, kind, tuple(sorted(opts.items())))
    if key in _CACHE and _CACHE[key].is_dir():
        return _CACHE[key]
    model, tok = tiny_model(kind, tokenizer=tokenizer, hidden=128, intermediate=256, heads=4, kv_heads=kv_heads)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=4, seqlen=32)), method, scheme, progress=False, **opts)
    out = mmcompress.save(model, root / f"{kind}-{method}-{key[1]}-kv{kv_heads}")
    tok.save_pretrained(out)
    _CACHE[key] = out
    return out


def _ids():
    return torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _reload(path):
    """What a user types: no options (the tiny models are saved in float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _ct_grid(x, bits):  # compressed-tensors' dynamic symmetric per-token int8 (calculate_qparams)
    if bits >= 16:
        return x
    s = (x.abs().amax(-1, keepdim=True) / 127.5).clamp(min=1e-10)
    return torch.clamp(torch.round(x / s), -128, 127) * s


@pytest.mark.parametrize("method", ["rtn", "smoothquant"])
def test_w8a8_round_trip(tmp_path, tokenizer, method, monkeypatch):
    art = _artifact(tmp_path, tokenizer, method, "w8a8")
    rep = export_compressed_tensors(art, tmp_path / "ct")
    assert rep["compression_format"] == "int-quantized" and rep["codes_identical"] == rep["quantized_linears"] == 14
    qc = read_export_config(tmp_path / "ct")
    g = qc["config_groups"]["group_0"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized" and qc["ignore"] == ["lm_head"]
    assert g["weights"]["strategy"] == "channel" and g["weights"]["symmetric"] and g["weights"]["num_bits"] == 8
    assert g["input_activations"]["strategy"] == "token" and g["input_activations"]["dynamic"]
    ours, ct, x = mmcompress.load(art, runtime="reference"), _reload(tmp_path / "ct"), _ids()
    with torch.no_grad():
        full = _rel(ct(x).logits, ours(x).logits)  # different activation grids (127.5 vs 127): reported, not exact
        for name, m in ours.named_modules():
            if isinstance(m, QuantLinear):
                assert torch.equal(ct.get_submodule(name).weight.float(), m.quantized_weight().float()), name
        for m in ct.modules():
            if hasattr(m, "quantization_scheme"):
                m.quantization_enabled = False
        for m in ours.modules():
            if isinstance(m, QuantLinear):
                m.scheme = dataclasses.replace(m.scheme, abits=16)
        no_act = _rel(ct(x).logits, ours(x).logits)
        for m in ct.modules():
            if hasattr(m, "quantization_scheme"):
                m.quantization_enabled = True
        for m in ours.modules():
            if isinstance(m, QuantLinear):
                m.scheme = dataclasses.replace(m.scheme, abits=8)
        monkeypatch.setattr("mmcompress.quant.linear.fake_quantize_activation", _ct_grid)
        aligned = _rel(ct(x).logits, ours(x).logits)
    print(f"W8A8 {method}: rel err weights-only {no_act:.2e}, same act grid {aligned:.2e}, ct grid vs ours {full:.2e}")
    assert no_act < 1e-5 and aligned < 1e-3 and full < 0.1


@pytest.mark.parametrize("method,opts", [("rtn", {}), ("smoothquant", {}), ("masquant", {"tie": True, "epochs": 0})])
def test_w4a16_round_trip(tmp_path, tokenizer, method, opts):
    art = _artifact(tmp_path, tokenizer, method, "w4a16", **opts)
    rep = export_compressed_tensors(art, tmp_path / "ct")
    assert rep["compression_format"] == "pack-quantized" and not rep["requantized"]
    g = read_export_config(tmp_path / "ct")["config_groups"]["group_0"]["weights"]
    assert (g["num_bits"], g["group_size"], g["strategy"], g["symmetric"]) == (4, 128, "group", False)
    if method == "masquant":  # q/k/v and gate/up divisors into the norms, o's into v's rows: all exact
        assert rep["folds"] == {"exact": 6, "inexact": 0, "inexact_examples": []}
        assert rep["dropped"]["non_text_smoothing_linears"] == 12 and "text path only" in rep["dropped"]["note"]
        assert "Text path only" in (tmp_path / "ct" / "README.md").read_text()
    ours, ct, x = mmcompress.load(art, runtime="reference"), _reload(tmp_path / "ct"), _ids()
    with torch.no_grad():
        err = _rel(ct(x).logits, ours(x).logits)
    print(f"W4A16 {method}: rel err {err:.2e}")
    assert err < 1e-3


@pytest.mark.parametrize("name,group,sym", [("w8a8", None, None), ("w4a16", 128, True), ("w4a16", 128, False),
                                            ("w4a16", 0, True), ("w4a16", 0, False)])
def test_plain_from_pretrained(tmp_path, tokenizer, name, group, sym):
    """``AutoModelForCausalLM.from_pretrained(dir)``, nothing else, for every exportable scheme.  W8A8 differs
    only by the activation grid (compressed-tensors ``absmax/127.5`` vs ours ``absmax/127``): < 5e-2;
    weight-only: < 1e-3 (float32 rounding)."""
    from safetensors import safe_open

    from mmcompress.quant.quantizer import resolve_scheme

    scheme = resolve_scheme(name, group_size=group, sym=sym)
    art = _artifact(tmp_path, tokenizer, "rtn", scheme)
    rep = export_compressed_tensors(art, tmp_path / "ct")
    qc = read_export_config(tmp_path / "ct")
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"]) == (scheme.wbits, scheme.sym, "group" if scheme.group_size
                                                               else "channel")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:  # what vLLM reads
        zp = "model.layers.0.mlp.down_proj.weight_zero_point"
        if name == "w4a16" and not sym:  # int32, packed 8 per word along the output dimension, as llm-compressor
            assert f.get_slice(zp).get_dtype() == "I32" and f.get_slice(zp).get_shape() == [128 // 8, 256 // (group or 256)]
        else:
            assert zp not in f.keys()
    assert qc.get("dequantize", False) == (name == "w4a16" and not sym) == ("transformers_loading" in rep)
    ours, ct, x = mmcompress.load(art, runtime="reference"), _reload(tmp_path / "ct"), _ids()
    with torch.no_grad():
        err = _rel(ct(x).logits, ours(x).logits)
    print(f"plain from_pretrained {scheme.name} g{group} sym={sym}: rel err {err:.2e}")
    assert err < (5e-2 if name == "w8a8" else 1e-3)


@pytest.mark.parametrize("scheme", ["w4a6", "w4a8-asym"])
def test_refuses_schemes_without_kernel(tmp_path, tokenizer, scheme):
    from mmcompress.quant.quantizer import resolve_scheme

    sc = resolve_scheme("w4a8", sym=False) if scheme == "w4a8-asym" else resolve_scheme(scheme)
    art = _artifact(tmp_path, tokenizer, "rtn", sc)
    with pytest.raises(ExportError, match=rf"{sc.name}.*no vLLM kernel.*exportable schemes: w8a8.*w4a16"):
        export_compressed_tensors(art, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    rows = {r["scheme"]: r for r in kernel_table()}
    assert rows["w8a8-int8"]["min_sm"] == 75 and rows["w4a16"]["min_sm"] == 80
    assert rows["w4a8-int"]["exportable"] and rows["w4a8-int"]["min_sm"] is None and not rows["w4a6"]["exportable"]


def test_w4a8_group_size_vllm_cannot_pack_is_refused(tmp_path, tokenizer):
    """torch's _dyn_quant_pack_4bit_weight (vLLM's CPU W4A8 kernel) takes groups of a multiple of 32 only."""
    from mmcompress.quant.quantizer import resolve_scheme

    art = _artifact(tmp_path, tokenizer, "rtn", resolve_scheme("w4a8", group_size=16))
    with pytest.raises(ExportError, match="W4A8 group size 16: .*multiples of 32, or per channel"):
        export_compressed_tensors(art, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("group", [0, 128])
def test_w4a8_exports_int4_codes_in_int8(tmp_path, tokenizer, group):
    """vLLM's CompressedTensorsW4A8Int reads ``weight`` int8 holding int4 codes (format int-quantized)."""
    from safetensors import safe_open

    from mmcompress.quant.quantizer import resolve_scheme

    art = _artifact(tmp_path, tokenizer, "rtn", resolve_scheme("w4a8", group_size=group))
    rep = export_compressed_tensors(art, tmp_path / "ct")
    assert rep["vllm_scheme"] == "CompressedTensorsW4A8Int" and rep["codes_identical"] == 14
    g = read_export_config(tmp_path / "ct")["config_groups"]["group_0"]
    assert (g["weights"]["num_bits"], g["weights"]["symmetric"], g["weights"]["group_size"]) == (4, True, group or None)
    assert g["input_activations"]["dynamic"] and g["input_activations"]["strategy"] == "token"
    assert "vLLM's CPU backend (Dynamic4bitLinearKernel) only" in (tmp_path / "ct" / "README.md").read_text()
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert w.dtype == torch.int8 and int(w.min()) >= -8 and int(w.max()) <= 7


def test_gqa_smoothing_needs_requantize(tmp_path, tokenizer):
    # o_proj keeps a run-time divisor (MASQuant's SmoothQuant baseline; the default skips that group)
    art = _artifact(tmp_path, tokenizer, "smoothquant", "w8a8", kv_heads=2, runtime_smoothing=True)
    with pytest.raises(ExportError, match="grouped-query attention.*--requantize"):
        export_compressed_tensors(art, tmp_path / "ct")
    rep = export_compressed_tensors(art, tmp_path / "ct", requantize=True)
    assert sorted(rep["requantized"]) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert rep["codes_identical"] == 12
    assert json.loads((tmp_path / "ct" / "mmcompress_export.json").read_text())["requantized"] == rep["requantized"]


def test_default_smoothquant_exports_exactly_under_gqa(tmp_path, tokenizer):
    art = _artifact(tmp_path, tokenizer, "smoothquant", "w8a8", kv_heads=2)
    rep = export_compressed_tensors(art, tmp_path / "ct-default")
    assert not rep.get("requantized")


def test_untied_masquant_vectors_are_refused(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer, hidden=128, intermediate=256, heads=4, kv_heads=4)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2, seqlen=16)), "rtn", "w8a8", progress=False)
    attn = model.model.layers[0].self_attn
    for k, proj in enumerate([attn.q_proj, attn.k_proj, attn.v_proj]):  # independent vectors, as untied MASQuant
        proj.input_smoothing = torch.full((3, 128), 1.0 + k)
    with pytest.raises(ExportError, match="different text smoothing vectors.*--tie"):
        preflight(model)
    assert preflight(model, requantize=True)["folds"]["inexact"] == 1


def test_multimodal_keeps_towers_unquantized(tmp_path, tokenizer):
    model, tok = tiny_model("qwen2_5_vl", tokenizer=tokenizer, hidden=128, intermediate=256, heads=4, kv_heads=4)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2, seqlen=16)), "rtn", "w8a8", progress=False)
    art = mmcompress.save(model, tmp_path / "vl")
    rep = export_compressed_tensors(art, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"] == [rep["architecture"]]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        tower = [k for k in keys if "visual" in k and k.endswith(".weight")]
        assert tower and all(f.get_slice(k).get_dtype() in ("F32", "BF16", "F16") for k in tower)
        tower_linears = {k.removesuffix(".weight") for k in tower if len(f.get_slice(k).get_shape()) == 2}
        quantized = {k.removesuffix(".weight_scale") for k in keys if k.endswith(".weight_scale")}
    ignore = set(cfg["quantization_config"]["ignore"])
    assert len(quantized) == 14 and not any("visual" in q for q in quantized)
    assert tower_linears and tower_linears <= ignore
    assert all(f"{n}.weight" in keys for n in ignore)  # ignore names are checkpoint names


def test_omni_thinker_exports_in_the_full_omni_layout(tmp_path, tokenizer):
    """vLLM serves the Qwen2.5-Omni thinker only as Qwen2_5OmniForConditionalGeneration (docs/vllm_plugin.md):
    the export nests the thinker config, prefixes every tensor and ``ignore`` entry with ``thinker.``, names
    the vision tower's fused ``attn.qkv`` in ``ignore`` (vLLM does not resolve it to q/k/v) and keeps the
    same tensors otherwise (tests/test_vllm_plugin.py serves it)."""
    from safetensors import safe_open

    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer, hidden=128, intermediate=256, heads=4, kv_heads=4)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2, seqlen=16)), "rtn", "w8a8", progress=False)
    art = mmcompress.save(model, tmp_path / "omni")
    rep = export_compressed_tensors(art, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5OmniForConditionalGeneration"] == [rep["container"]["architecture"]]
    assert cfg["model_type"] == "qwen2_5_omni" and cfg["enable_audio_output"] is False
    inner = cfg["thinker_config"]
    assert inner["model_type"] == "qwen2_5_omni_thinker" and "quantization_config" not in inner
    assert inner["text_config"]["num_hidden_layers"] == 2
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text()) \
        if (tmp_path / "ct" / "model.safetensors.index.json").is_file() else None
    assert keys and all(k.startswith("thinker.") for k in keys)
    assert index is None or set(index["weight_map"]) == keys
    assert {"thinker.model.layers.0.self_attn.q_proj.weight_scale", "thinker.lm_head.weight"} <= keys
    ignore = cfg["quantization_config"]["ignore"]
    assert ignore == rep["ignore"] and all(n.startswith("thinker.") for n in ignore)
    assert "thinker.visual.blocks.0.attn.qkv" in ignore and "thinker.visual.blocks.1.attn.qkv" in ignore
    assert all(f"{n}.weight" in keys for n in ignore if not n.endswith(".attn.qkv"))
    assert not any(n.startswith("thinker.model.layers") for n in ignore)


def test_cli_check_and_export(tmp_path, tokenizer, capsys):
    from mmcompress.cli import main

    art = _artifact(tmp_path, tokenizer, "rtn", "w8a8")
    assert main(["export", str(art), "--check", "--json"]) == 0
    out = capsys.readouterr()
    assert "Turing sm75" in out.err and "w4a8-int" in out.err
    rep = json.loads(out.out.strip().splitlines()[-1])
    assert rep["vllm_scheme"] == "CompressedTensorsW8A8Int8" and not (tmp_path / "ct").exists()
    assert main(["export", str(art), "--format", "compressed-tensors", "--output", str(tmp_path / "ct"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["codes_identical"] == 14 and (tmp_path / "ct" / "tokenizer.json").is_file()
    assert main(["export", str(art)]) == 1 and "--output is required" in capsys.readouterr().err
