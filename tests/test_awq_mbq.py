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
