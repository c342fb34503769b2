import copy

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.quantizer import QuantScheme

from .conftest import mm_inputs, text_samples, tiny_model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _calib_and_input(kind, tok):
    if kind in ("qwen2_5_vl", "qwen2_5_omni"):
        samples = [mm_inputs(kind, tok, seed=s)[0] for s in range(3)]
        x = mm_inputs(kind, tok, seed=7, text=" a lazy dog jumps over")[0]
    else:
        samples = text_samples(tok, n=4)
        x = {"input_ids": torch.randint(0, len(tok) - 10, (1, 24), generator=torch.Generator().manual_seed(9))}
    return CalibrationSet(samples), x


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma3", "qwen2_5_vl", "qwen2_5_omni"])
def test_smoothquant_without_quantization_preserves_logits(kind, tokenizer):
    model, tok = tiny_model(kind, tokenizer=tokenizer)
    calib, x = _calib_and_input(kind, tok)
    ref = model(**x).logits
    m = copy.deepcopy(model)
    mmcompress.quantize(m, calib, "smoothquant", QuantScheme(16, 16), progress=False, runtime_smoothing=True)
    # smoothing really happened: norms were rescaled and the readers' weights changed
    layer0 = m.get_submodule(f"{'model.language_model' if 'qwen2_5' in kind else 'model'}.layers.0")
    orig0 = model.get_submodule(f"{'model.language_model' if 'qwen2_5' in kind else 'model'}.layers.0")
    assert isinstance(layer0.self_attn.q_proj, QuantLinear)
    assert not torch.allclose(layer0.self_attn.q_proj.weight, orig0.self_attn.q_proj.weight)
    assert _rel(m(**x).logits, ref) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2_5_omni"])
def test_smoothquant_beats_rtn_at_w4a8_on_outlier_channels(kind, tokenizer):
    """With injected activation outliers, SmoothQuant must reduce the W8A8/W4A8 output error."""
    model, tok = tiny_model(kind, tokenizer=tokenizer)
    with torch.no_grad():  # outlier channels in the inputs of q/k/v and gate/up
        for name, p in model.named_parameters():
            if name.endswith("input_layernorm.weight") or name.endswith("post_attention_layernorm.weight"):
                p[:3] *= 40
    calib, x = _calib_and_input(kind, tok)
    ref = model(**x).logits
    errs = {}
    for method in ("rtn", "smoothquant"):
        m = copy.deepcopy(model)
        mmcompress.quantize(m, calib, method, "w8a8", progress=False)
        errs[method] = _rel(m(**x).logits, ref)
    assert errs["smoothquant"] < errs["rtn"], errs


def test_smoothquant_alpha_validation(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="alpha"):
        mmcompress.quantize(model, CalibrationSet(text_samples(tok)), "smoothquant", "w8a8", alpha=1.5)


def test_unknown_method(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="unknown quantization method"):
        mmcompress.quantize(model, CalibrationSet(text_samples(tok)), "gptq-magic", "w8a8")
