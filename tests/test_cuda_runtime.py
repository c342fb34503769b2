"""The integer runtime on CUDA (``quant.deployed`` / ``quant.kernels``' torch path: ``torch._int_mm``).

Issue 15 asks that the deployed module run on CUDA, untuned.  Every test here needs a CUDA device
(``-m gpu``; skipped with the reason otherwise).  The CUDA result is checked against the fake-quant
reference on the same device (the same tolerance as on the CPU: both sum code × code products exactly
and differ only in the float epilogue) and against the CPU's integer result.
"""

import copy

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.quant.deployed import IntLinear, IntMASLinear
from mmcompress.quant.quantizer import QuantScheme

from .conftest import text_samples, tiny_model
from .test_int_runtime import TOL, _packed, _rel_max, masquant_omni_artifact

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SCHEMES = [QuantScheme(8, 8, 0, True), QuantScheme(8, 8, 64, False), QuantScheme(4, 8, 0, True),
           QuantScheme(4, 8, 64, False), QuantScheme(4, 6, 0, True), QuantScheme(4, 16, 64, False),
           QuantScheme(4, 16, 128, True), QuantScheme(8, 16, 0, True)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("tokens", [1, 8, 40])
def test_cuda_layer_equals_reference_and_cpu(scheme, tokens):
    q = _packed(96, 320, scheme)  # 320 = 2.5 groups of 128: a ragged last group
    x = torch.randn(2, tokens, 320) * 3
    x[..., 5] *= 40
    cpu = IntLinear(copy.deepcopy(q))(x)
    qc = copy.deepcopy(q).cuda()
    ref = qc(x.cuda())
    d = IntLinear(copy.deepcopy(qc))
    y = d(x.cuda())
    assert y.is_cuda and y.dtype == ref.dtype and y.shape == ref.shape
    assert _rel_max(y, ref) <= TOL
    assert _rel_max(y.cpu(), cpu) <= TOL
    assert d.weight_codes.is_cuda and d.weight_codes.dtype in (torch.int8, torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_layer_half_precision(dtype):
    q = _packed(64, 256, QuantScheme(8, 8, 0, True)).cuda().to(dtype)
    x = torch.randn(3, 256, device="cuda", dtype=dtype)
    y = IntLinear(copy.deepcopy(q))(x)
    ref = q(x)
    assert y.dtype == dtype and torch.isfinite(y).all() and _rel_max(y, ref) < 2e-2


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16", "w4a8"])
def test_cuda_model_logits_and_greedy_tokens(tmp_path, tokenizer, scheme):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", scheme, progress=False)
    art = mmcompress.save(model, tmp_path / "a")
    x = torch.randint(0, len(tok) - 10, (1, 12), generator=torch.Generator().manual_seed(4))
    ref = mmcompress.load(art, device="cuda", runtime="reference")
    fast = mmcompress.load(art, device="cuda")
    cpu = mmcompress.load(art)
    assert any(isinstance(m, IntLinear) and m.weight_codes.is_cuda for m in fast.modules())
    with torch.no_grad():
        a = ref(input_ids=x.cuda()).logits
        b = fast(input_ids=x.cuda()).logits
        c = cpu(input_ids=x).logits
    assert b.is_cuda and _rel_max(b, a) <= TOL and _rel_max(b.cpu(), c) <= TOL
    g_cuda = fast.generate(input_ids=x.cuda(), max_new_tokens=8, do_sample=False)
    g_cpu = cpu.generate(input_ids=x, max_new_tokens=8, do_sample=False)
    assert torch.equal(g_cuda.cpu(), g_cpu)


def test_cuda_masquant_modality_path(tmp_path, tokenizer):
    """E17 on CUDA: image/audio tokens take their smoothing row plus the low-rank correction."""
    art, _, x = masquant_omni_artifact(tmp_path, tokenizer)
    ref = mmcompress.load(art, device="cuda", runtime="reference")
    fast = mmcompress.load(art, device="cuda")
    assert any(isinstance(m, IntMASLinear) and m.cmc_left is not None for m in fast.modules())
    xc = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in x.items()}
    with torch.no_grad():
        assert _rel_max(fast(**xc).logits, ref(**xc).logits) <= TOL


def test_cuda_streamed_quantize_cli(tmp_path, tiny_llama_dir, calib_text):
    """``quantize --device cuda`` on the streamed path (the default): a streamed model's final norm and head
    stay on the meta device through the capture pass (moving them to CUDA failed: "Cannot copy out of meta
    tensor").  The artifact runs and is as close to the CPU-calibrated one as rounding allows."""
    from mmcompress.cli import main

    outs = {}
    for dev in ("cpu", "cuda"):
        outs[dev] = tmp_path / dev
        assert main(["quantize", str(tiny_llama_dir), "--method", "smoothquant", "--scheme", "w8a8", "--calib",
                     str(calib_text), "--nsamples", "2", "--seqlen", "32", "--device", dev, "--no-progress",
                     "-o", str(outs[dev])]) == 0
    x = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = mmcompress.load(outs["cpu"])(input_ids=x).logits
        b = mmcompress.load(outs["cuda"])(input_ids=x).logits
    assert torch.isfinite(b).all() and float((a - b).norm() / a.norm()) < 1e-2
