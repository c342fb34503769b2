"""The MASQuant part of a compressed-tensors export (what the vLLM plugin reads), without vLLM.

The plugin computes, for a token of modality m whose input reached the layer as ``x_f = x / s*``::

    y = Q_a(x_f ⊙ ratio_m) · Ŵᵀ + b + x_f · left_m · right_m

with ``Ŵ`` the checkpoint's codes × step sizes.  These tests evaluate that formula on the exported
files and compare it with our deployed layer (E17) under the same modality ids.
"""

import json

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.models.modality import IMAGE, TEXT, modality_context
from mmcompress.quant.quantizer import fake_quantize_activation

from .conftest import mm_inputs, tiny_model

pytest.importorskip("compressed_tensors")

from mmcompress.export.compressed_tensors import export_compressed_tensors, read_export_config  # noqa: E402
from mmcompress.export.masquant_vllm import SIDE_FILE  # noqa: E402


@pytest.fixture(scope="module")
def vl_export(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("vlplugin")
    model, tok = tiny_model("qwen2_5_vl", tokenizer=tokenizer, hidden=128, intermediate=256, heads=4, kv_heads=4)
    calib = CalibrationSet([mm_inputs("qwen2_5_vl", tok, seed=s)[0] for s in range(3)])
    mmcompress.quantize(model, calib, "masquant", "w8a8", progress=False, epochs=1, tie=True)
    art = mmcompress.save(model, root / "art")
    rep = export_compressed_tensors(art, root / "ct")
    return art, root / "ct", rep


def test_export_writes_the_plugin_part(vl_export):
    art, ct, rep = vl_export
    section = read_export_config(ct)["mmcompress_masquant"]
    assert section["modalities"] == ["image"] and section["modality_token_ids"] == {"image": 1}
    assert section["linears"] == 12 and section["cmc_linears"] == 12 and not section["inexact_linears"]
    assert rep["masquant_plugin"] == section
    index = json.loads((ct / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {"model.safetensors"}  # stock loaders never read the side file
    assert (ct / SIDE_FILE).is_file() and "plugin" in (ct / "README.md").read_text()


@pytest.mark.parametrize("path", ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj"])
@pytest.mark.parametrize("mid", [TEXT, IMAGE])
def test_plugin_formula_on_the_export_equals_our_layer(vl_export, path, mid):
    from safetensors.torch import load_file

    art, ct, _ = vl_export
    model = mmcompress.load(art, runtime="reference")
    q = model.get_submodule(f"model.language_model.layers.1.{path}")
    stock, side = load_file(str(ct / "model.safetensors")), load_file(str(ct / SIDE_FILE))
    w = stock[f"model.layers.1.{path}.weight"].float() * stock[f"model.layers.1.{path}.weight_scale"].float()
    b = stock.get(f"model.layers.1.{path}.bias")
    x = torch.randn(5, q.in_features, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.full((5,), mid, dtype=torch.int8)
    with torch.no_grad(), modality_context(ids):
        ref = q(x)
    if path == "self_attn.v_proj":  # the export folded o_proj's text vector into v's output rows
        ref = ref / model.get_submodule("model.language_model.layers.1.self_attn.o_proj").input_smoothing[0]
    x_f = x / q.input_smoothing[0]  # exact fold: the producer divides by s_T
    ratio = side[f"layers.1.{path}.input_ratio"][mid]
    y = fake_quantize_activation(x_f * ratio, 8) @ w.T + (0 if b is None else b.float())
    if mid != TEXT:
        y = y + (x_f @ side[f"layers.1.{path}.cmc_left"][mid]) @ side[f"layers.1.{path}.cmc_right"][mid]
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()), (y - ref).abs().max()
    if mid != TEXT:  # and the text path alone would not do
        plain = fake_quantize_activation(x_f, 8) @ w.T + (0 if b is None else b.float())
        assert (plain - ref).abs().max() > 100 * (y - ref).abs().max()
