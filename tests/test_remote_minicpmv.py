"""MiniCPM-Llama3-V-2.5 / MiniCPM-V 2.6 through --trust-remote-code, on a tiny local remote-code directory
(tests/_remote.py; no hub): refused without the flag (one line, nothing imported, nothing written), and
with it found (the LLM decoder inside ``llm``, images from ``image_bound``), quantized with the image
tokens routed (forward and the model's own generate), saved (with its code) and loaded with identical
logits, compressed from the CLI."""

import copy
import json

import pytest
import torch

import mmcompress
from mmcompress.cli import main
from mmcompress.models.adapters import get_adapter
from mmcompress.models.loading import RemoteCodeError, load_hf_model
from mmcompress.models.minicpmv import to_data
from mmcompress.models.modality import IMAGE, TEXT, current_modality_ids
from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.quantizer import QuantScheme

from ._remote import IMAGE_TOKENS, remote_inputs, write_remote_minicpmv


@pytest.fixture
def remote_dir(tmp_path, tokenizer):
    return write_remote_minicpmv(tmp_path / f"minicpmv-{tmp_path.name}", tokenizer)


def _calib(tok, n=2):
    texts = [" the quick brown fox jumps over the lazy dog", " red green blue images audio and text"]
    return [remote_inputs(tok, seed=j, text=texts[j % 2]) for j in range(n)]


@torch.no_grad()
def _logits(model, x):
    return model(**x, use_cache=False).logits.float()


def _sqnr(y, ref):
    return float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum().clamp(min=1e-30)))


def test_refused_without_trust_remote_code(remote_dir, calib_text, tmp_path, capsys, monkeypatch):
    sentinel = tmp_path / "imported"
    monkeypatch.setenv("MMCOMPRESS_REMOTE_CODE_SENTINEL", str(sentinel))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"steps": [{"quantize": {"method": "rtn", "scheme": "w8a8"}}]}))
    calib = ["--calib", str(calib_text), "--nsamples", "2", "--seqlen", "16"]
    runs = {"quantize": calib, "compress": ["--recipe", str(recipe), *calib], "sparsify": ["--sparsity", "0.3", *calib],
            "quantize data-free": []}
    for name, extra in runs.items():
        cmd = name.split()[0]
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        rc = main([cmd, str(remote_dir), *extra, "-o", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1, (cmd, err)
        assert "--trust-remote-code" in err and ("modeling_minicpmv.MiniCPMV" in err or "configuration_minicpm" in err)
        assert not out.exists()
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        load_hf_model(remote_dir)
    assert not sentinel.exists()  # the directory's Python files were never imported
    load_hf_model(remote_dir, trust_remote_code=True)  # (the sentinel does work)
    assert sentinel.exists()


def test_adapter_finds_the_llm_and_routes_image_bounds(remote_dir, tokenizer):
    model = load_hf_model(remote_dir, trust_remote_code=True)
    adapter = get_adapter(model)
    assert adapter.family == "minicpmv" and adapter.layers is model.llm.model.layers
    assert adapter.lm_head is model.llm.lm_head and not adapter.tied
    assert adapter.modality_token_ids == {} and adapter.routed  # images come from image_bound, not a token id
    x = remote_inputs(tokenizer, seed=3)
    with torch.no_grad():
        native = model(data=to_data(dict(x)), use_cache=False).logits  # the model's own calling convention
    torch.testing.assert_close(_logits(model, x), native.float())
    from mmcompress.engine import capture_inputs

    cap = capture_inputs(model, adapter, [x], progress=False)
    ids = cap.modality[0][0]
    assert ids[1:1 + IMAGE_TOKENS].eq(IMAGE).all() and int((ids == IMAGE).sum()) == IMAGE_TOKENS


def test_smoothing_is_exact(remote_dir, tokenizer):
    model = load_hf_model(remote_dir, trust_remote_code=True)
    x = remote_inputs(tokenizer, seed=7)
    ref = _logits(model, x)
    mmcompress.quantize(model, _calib(tokenizer), "smoothquant", QuantScheme(16, 16), progress=False)
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-4, atol=1e-4)


def test_masquant_save_load_forward(remote_dir, tokenizer, tmp_path):
    model = load_hf_model(remote_dir, trust_remote_code=True)
    x = remote_inputs(tokenizer, seed=7)
    ref = _logits(model, x)
    mmcompress.quantize(model, _calib(tokenizer), "masquant", "w4a8", progress=False, epochs=1)
    desc = model._mmcompress_description
    assert desc["calibration"]["tokens"]["image"] == 2 * IMAGE_TOKENS
    adapter = get_adapter(model)
    assert all(isinstance(model.get_submodule(f"{adapter.layer_prefix(i)}.{p}"), QuantLinear)
               for i in range(len(adapter.layers)) for p in adapter.linear_names(i))
    y = _logits(model, x)
    assert _sqnr(y, ref) > 5

    seen = []  # the forward routes the image_bound span as image, the rest as text
    gate = model.llm.model.layers[0].mlp.gate_proj
    handle = gate.register_forward_pre_hook(lambda m, a: seen.append(current_modality_ids().clone()))
    _logits(model, x)
    handle.remove()
    assert seen[0][0, 1:1 + IMAGE_TOKENS].eq(IMAGE).all() and int((seen[0] == TEXT).sum()) == x["input_ids"].shape[1] - IMAGE_TOKENS

    art = mmcompress.save(model, tmp_path / "mas")
    assert (art / "modeling_minicpmv.py").is_file() and json.loads((art / "config.json").read_text())["auto_map"]
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        mmcompress.load(art, runtime="reference")
    loaded = mmcompress.load(art, runtime="reference", trust_remote_code=True)
    assert torch.equal(_logits(loaded, x), y)
    assert torch.equal(_logits(loaded, remote_inputs(tokenizer, seed=7, image=False)),
                       _logits(model, remote_inputs(tokenizer, seed=7, image=False)))

    # the model's own generate (images embedded, then llm.generate on embeddings): prefill routed, decode text
    seen = []
    gate = loaded.llm.model.layers[0].mlp.gate_proj
    handle = gate.register_forward_pre_hook(lambda m, a: seen.append(current_modality_ids()))
    try:
        out = loaded.generate(**x, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert out.shape[-1] == 3 and len(seen) == 3
    assert seen[0][0, 1:1 + IMAGE_TOKENS].eq(IMAGE).all() and int((seen[0] == IMAGE).sum()) == IMAGE_TOKENS
    assert all(ids is None or bool((ids == TEXT).all()) for ids in seen[1:])


@pytest.mark.parametrize("mode", ["merged", "reference"])
def test_larosa(remote_dir, tokenizer, tmp_path, mode):
    """Merged mode rotates the resampler's proj with the embedding: at sparsity 0 the logits with an image
    are the model's (they are not if proj is left out)."""
    model = load_hf_model(remote_dir, trust_remote_code=True)
    calib = _calib(tokenizer)
    x = remote_inputs(tokenizer, seed=7)
    ref = _logits(model, x)
    dense = mmcompress.sparsify(copy.deepcopy(model), calib, "larosa", 0.0, mode=mode, progress=False)
    torch.testing.assert_close(_logits(dense, x), ref, rtol=1e-3, atol=1e-3)
    mmcompress.sparsify(model, calib, "larosa", 0.4, mode=mode, progress=False)
    from mmcompress.sparse.api import measure_sparsity

    assert abs(measure_sparsity(model, [x])["model_sparsity"] - 0.4) < 0.03
    y = _logits(model, x)
    assert torch.isfinite(y).all() and not torch.equal(y, ref) and _sqnr(y, ref) > 0
    loaded = mmcompress.load(mmcompress.save(model, tmp_path / "larosa"), runtime="reference", trust_remote_code=True)
    assert torch.equal(_logits(loaded, x), y)


def test_cli_quantize_and_compress_with_trust(remote_dir, calib_text, tmp_path, tokenizer):
    common = ["--calib", str(calib_text), "--nsamples", "2", "--seqlen", "16", "--trust-remote-code", "--no-progress"]
    out = tmp_path / "rtn"
    assert main(["quantize", str(remote_dir), "--method", "smoothquant", "--scheme", "w8a8", "-o", str(out), *common]) == 0
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"steps": [{"sparsify": {"method": "larosa", "sparsity": 0.3, "mode": "reference"}},
                                            {"quantize": {"method": "rtn", "scheme": "w8a8"}}]}))
    out2 = tmp_path / "joint"
    assert main(["compress", str(remote_dir), "--recipe", str(recipe), "-o", str(out2), *common]) == 0
    x = remote_inputs(tokenizer, seed=5)
    ref = _logits(load_hf_model(remote_dir, trust_remote_code=True), x)
    for art in (out, out2):
        y = _logits(mmcompress.load(art, trust_remote_code=True), x)  # the default (integer) runtime
        assert torch.isfinite(y).all() and _sqnr(y, ref) > 3, art
