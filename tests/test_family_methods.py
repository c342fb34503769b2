"""The other methods on every family of issue 18, end to end on a tiny random model (no download):
AWQ and MBQ (quantization: every decoder linear quantized, scales searched per group, save -> load
with identical logits) and TEAL and CATS (activation sparsity: thresholds calibrated, realised
sparsity measured, save -> load with identical logits).  RTN, SmoothQuant, MASQuant and LaRoSA are
in test_families.py.  Qwen3.5 and the MiniCPM-V 4.6/4.7 built on it have linear-attention layers:
TEAL thresholds their projections' inputs too, CATS their MLPs (LaRoSA: test_families.py); WINA refuses
them by name (its basis is the SVD of k_proj).

Run one family with ``-k <kind>``.
"""

import copy

import pytest
import torch

import mmcompress
from mmcompress.models.adapters import UnsupportedModelError, get_adapter
from mmcompress.quant.linear import QuantLinear
from mmcompress.sparse.api import measure_sparsity
from mmcompress.sparse.linear import SparseLinear
from mmcompress.sparse.merge import ThresholdedActivation

from ._families import calibration, family_inputs
from ._remote import remote_inputs, write_remote_minicpmv
from .test_families import KINDS, MULTIMODAL, _logits, _model, _n_linears, _sqnr

LINEAR_ATTENTION = {"qwen3_5", "qwen3_5_vl", "minicpmv4_6", "minicpmv4_7"}
REMOTE = "minicpmv_remote"  # MiniCPM-Llama3-V-2.5's structure, from a tiny local remote-code directory
ALL_KINDS = [*KINDS, REMOTE]


def _setup(kind, tok, tmp_path):
    """(model, calibration, probe inputs, load keyword arguments) for ``kind``."""
    if kind == REMOTE:
        from mmcompress.models.loading import load_hf_model

        model = load_hf_model(write_remote_minicpmv(tmp_path / "src", tok), trust_remote_code=True)
        calib = [remote_inputs(tok, seed=j, text=t) for j, t in enumerate((" the quick brown fox", " red green blue"))]
        return model, calib, remote_inputs(tok, seed=7), {"trust_remote_code": True}
    return _model(kind, tok), calibration(kind, tok), family_inputs(kind, tok, seed=7), {}


@pytest.mark.parametrize("method,scheme", [("awq", "w4a16"), ("mbq", "w4a8")])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_scale_search_methods(kind, method, scheme, tokenizer, tmp_path):
    model, calib, x, load_kw = _setup(kind, tokenizer, tmp_path)
    ref = _logits(model, x)
    mmcompress.quantize(model, calib, method, scheme, progress=False, grid=4)
    adapter = get_adapter(model)
    assert sum(isinstance(m, QuantLinear) for m in adapter.layers.modules()) == _n_linears(adapter)
    for info in model._mmcompress_description["layers"]:  # every foldable group got a searched scale
        assert {"attn_in", "mlp_in"} <= set(info[method]["alpha"])
    if method == "mbq":
        weights = model._mmcompress_description["method_summary"]["loss_weights"]
        assert weights["text"] == 1.0
        assert (weights.get("image", 0) > 0) == (kind in MULTIMODAL or kind == REMOTE)
    y = _logits(model, x)
    assert not torch.equal(y, ref) and _sqnr(y, ref) > 5
    loaded = mmcompress.load(mmcompress.save(model, tmp_path / method), runtime="reference", **load_kw)
    assert torch.equal(_logits(loaded, x), y)


@pytest.mark.parametrize("method,sparsity", [("teal", 0.4), ("cats", 0.25)])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_threshold_sparsity_methods(kind, method, sparsity, tokenizer, tmp_path):
    model, calib, x, load_kw = _setup(kind, tokenizer, tmp_path)
    if kind in LINEAR_ATTENTION:
        with pytest.raises(UnsupportedModelError, match="no k_proj.*linear-attention"):
            mmcompress.sparsify(copy.deepcopy(model), calib, "wina", sparsity, progress=False)
    ref = _logits(model, x)
    dense = mmcompress.sparsify(copy.deepcopy(model), calib, method, 0.0, progress=False)
    torch.testing.assert_close(_logits(dense, x), ref)  # threshold 0 keeps every activation
    mmcompress.sparsify(model, calib, method, sparsity, progress=False)
    desc = model._mmcompress_description["method"]
    assert desc["method"] == method and abs(desc["model_sparsity"] - sparsity) < 0.02  # the plan
    got = measure_sparsity(model, calib)["model_sparsity"]  # realised on the calibration inputs
    assert abs(got - sparsity) < 0.1, got
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers):  # TEAL: every decoder linear (incl. Gated-DeltaNet's); CATS: the MLP
        sparse = {p for p in adapter.linear_names(i) if isinstance(layer.get_submodule(p), SparseLinear)}
        assert sparse == (set(adapter.linear_names(i)) if method == "teal" else set())
        if method == "cats":
            assert isinstance(layer.mlp.act_fn, ThresholdedActivation)
    y = _logits(model, x)
    assert torch.isfinite(y).all() and not torch.equal(y, ref)
    if kind in MULTIMODAL or kind == REMOTE:
        assert getattr(model, "_mmcompress_router", None) is not None
    loaded = mmcompress.load(mmcompress.save(model, tmp_path / method), runtime="reference", **load_kw)
    assert torch.equal(_logits(loaded, x), y)


@pytest.mark.parametrize("kind", ["qwen3_5", REMOTE])
def test_data_free_rtn_equals_in_memory_rtn(kind, tokenizer, calib_text, tmp_path, capsys):
    """``quantize`` without --calib on a hybrid decoder (per-layer linears) and on remote code (its meta
    skeleton built through the directory's code, only with --trust-remote-code)."""
    from mmcompress.cli import main
    from .tiny_models import save_tiny

    from .test_datafree import _same_artifact

    if kind == REMOTE:
        src, trust = write_remote_minicpmv(tmp_path / "src", tokenizer), ["--trust-remote-code"]
    else:
        src, trust = save_tiny(tmp_path / "src", kind, tokenizer=tokenizer), []
    common = ["--scheme", "w8a8", "--no-progress", *trust]
    assert main(["quantize", str(src), "-o", str(tmp_path / "free"), *common]) == 0, capsys.readouterr().err
    assert main(["quantize", str(src), "--calib", str(calib_text), "--nsamples", "2", "--seqlen", "16",
                 "-o", str(tmp_path / "mem"), *common]) == 0, capsys.readouterr().err
    _same_artifact(tmp_path / "free", tmp_path / "mem")
    for art in ("free", "mem"):  # remote code travels with the artifact (and nothing else does)
        assert {f.name for f in (tmp_path / art).glob("*.py")} == (
            {"configuration_minicpm.py", "modeling_minicpmv.py"} if kind == REMOTE else set())
