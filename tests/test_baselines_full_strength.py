"""Issue 17 item 6: AWQ's block-output loss and weight clipping, and one choice of activation
statistics (the full-precision model) for every quantization method."""

import copy

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.models import get_adapter
from mmcompress.quant.methods import QUANT_METHODS
from mmcompress.quant.methods.awq import AWQ, apply_clip, clip_bounds
from mmcompress.quant.methods.base import weight_column_absmax
from mmcompress.quant.methods.smoothquant import smoothing_factors
from mmcompress.quant.quantizer import fake_quantize_activation, fake_quantize_weight, resolve_scheme

from .conftest import text_samples, tiny_model


def _outlier_llama(tokenizer, seed=3):
    model, tok = tiny_model("llama", tokenizer=tokenizer, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("input_layernorm.weight") or name.endswith("post_attention_layernorm.weight"):
                p[:4] *= 30
    return model, tok


def _record_calls(model, module, samples):
    """``(args, kwargs, output)`` of every call of ``module`` while the full-precision model runs."""
    calls = []

    def hook(mod, args, kwargs, out):
        calls.append((args, kwargs, (out[0] if isinstance(out, tuple) else out).detach()))

    h = module.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for s in samples:
            model(**s)
    h.remove()
    return calls


@pytest.mark.parametrize("layer", [0, 1])
def test_awq_block_loss_never_worse_than_rtn_on_its_objective(tokenizer, layer):
    """The attention block's output error with q/k/v quantized under AWQ's chosen scales (read back from
    the artifact: γ before / γ after) is below plain RTN of q/k/v, on the full-precision model's inputs
    of that block (the reference's objective: weight ``Q(W ⊙ s) / s``, everything else full precision)."""
    model, tok = _outlier_llama(tokenizer)
    samples = text_samples(tok, n=4, seqlen=40)
    awq = copy.deepcopy(model)
    mmcompress.quantize(awq, CalibrationSet(samples), "awq", "w4a16", progress=False, clip=False)
    assert awq._mmcompress_description["layers"][layer]["awq"]["alpha"]["attn_in"] is not None  # not s = 1
    adapter = get_adapter(model)
    norm = lambda m: adapter.norm_scale(m.model.layers[layer].input_layernorm).double()
    s = norm(model) / norm(awq)
    attn = model.model.layers[layer].self_attn
    calls = _record_calls(model, attn, samples)
    sc = resolve_scheme("w4a16")

    def error(scales):
        block = copy.deepcopy(attn)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):
                lin = getattr(block, name)
                w = lin.weight.double() * scales[None, :]
                lin.weight.copy_((fake_quantize_weight(w.float(), sc.wbits, sc.group_size, sc.sym).double()
                                  / scales[None, :]).float())
            return sum(float((block(*a, **k)[0] - out).pow(2).sum()) for a, k, out in calls)

    rtn, chosen = error(torch.ones_like(s)), error(s)
    assert chosen < rtn, (chosen, rtn)


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8", "w3a16-g32"])
def test_awq_clipping_never_increases_a_linears_output_error(scheme):
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(2.5).sample((96, 256))  # heavy-tailed rows: clipping pays
    x = torch.randn(300, 256, generator=g)
    x[:, 5] *= 15
    sc = resolve_scheme("w4a16", wbits=3, group_size=32) if scheme == "w3a16-g32" else resolve_scheme(scheme)
    bound = clip_bounds(w, x, sc)
    wc = apply_clip(w, bound, sc.group_size)
    xq = fake_quantize_activation(x, sc.abits)

    def row_error(weight):
        return (xq @ fake_quantize_weight(weight, sc.wbits, sc.group_size, sc.sym).T - x @ w.T).pow(2).sum(0)

    before, after = row_error(w), row_error(wc)
    assert bool((after <= before * (1 + 1e-6) + 1e-9).all())
    clipped = torch.isfinite(bound).any(-1)
    assert int(clipped.sum()) > 0  # the test would be vacuous otherwise
    assert float(after.sum()) < float(before.sum())
    unclipped = ~clipped
    assert torch.equal(wc[unclipped], w[unclipped])


def test_awq_clips_every_linear_but_q_and_k(tokenizer):
    model, tok = _outlier_llama(tokenizer)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2, seqlen=32)), "awq", "w4a16", progress=False)
    info = model._mmcompress_description["layers"][0]["awq"]
    assert set(info["clipped_rows"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                         "mlp.down_proj"}
    assert AWQ(resolve_scheme("w4a16")).config()["loss"] == "block"


def test_every_calibrated_method_takes_statistics_from_the_full_precision_model(tokenizer):
    """SmoothQuant's layer-1 smoothing vector is E2 of the full-precision model's layer-1 activations
    (on the quantized chain, at W4A8, the activations and hence s differ)."""
    model, tok = tiny_model("llama", tokenizer=tokenizer, seed=5)
    samples = text_samples(tok, n=3, seqlen=32)
    sq = copy.deepcopy(model)
    mmcompress.quantize(sq, CalibrationSet(samples), "smoothquant", "w4a8", progress=False)
    layer = model.model.layers[1]
    absmax = torch.zeros(layer.self_attn.q_proj.in_features, dtype=torch.float64)

    def hook(mod, args):
        absmax.copy_(torch.maximum(absmax, args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).double()))

    h = layer.self_attn.q_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for s in samples:
            model(**s)
    h.remove()
    readers = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    expected = smoothing_factors(absmax, weight_column_absmax(readers), 0.5)
    adapter = get_adapter(model)
    norm = lambda m: adapter.norm_scale(m.model.layers[1].input_layernorm).double()
    torch.testing.assert_close(norm(model) / norm(sq), expected, rtol=1e-5, atol=1e-8)
    for name, cls in QUANT_METHODS.items():
        if name != "rtn":
            assert cls.needs_fp_chain, name
