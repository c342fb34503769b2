"""The fused decode step (``mmcompress.runtime.fused``): one C++ call per token, the same logits as the
engine's Python step.

Tiny random Llama and Qwen2 models (Qwen2: q/k/v bias, tied head), dense and every integer scheme,
fp32 and bf16, offline.  Speed is measured by ``mmcompress bench decode``, never here.
"""

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.runtime import fused
from mmcompress.runtime.decode import DecodeEngine

from .conftest import text_samples, tiny_model

pytestmark = pytest.mark.skipif(not fused.load(), reason="no fused CPU kernel here")


def _engines(tmp_path, tokenizer, kind, scheme, dtype, **kw):
    model, tok = tiny_model(kind, tokenizer=tokenizer, tie=(kind == "qwen2"), dtype=dtype, hidden=128,
                            intermediate=256, **kw)
    if scheme:
        mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", scheme, progress=False)
    model = mmcompress.load(mmcompress.save(model, tmp_path / f"{kind}-{scheme}"))
    py, fu = DecodeEngine(model, max_len=40, fused=False), DecodeEngine(model, max_len=40)
    assert fu.fused and not py.fused
    return model, tok, py, fu


# fp32: the same arithmetic up to summation order; bf16: both round every op to bf16 (8 bits), and a
# rounding that falls the other way in one residual add moves the logits by a bf16 ulp of the stream
TOL = {torch.float32: 2e-5, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", [None, "w8a8", "w4a8", "w4a16"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_step_logits_equal_python_step(tmp_path, tokenizer, kind, scheme, dtype):
    model, tok, py, fu = _engines(tmp_path, tokenizer, kind, scheme, dtype)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for e in (py, fu):
            e._reset()
            e._forward(ids, 0)  # the same prefill fills both caches
        t = torch.tensor([[5]])
        for i in range(24):  # teacher-forced with the Python step's greedy tokens
            lp, lf = py._step(t, 9 + i), fu._step(t, 9 + i)
            assert lf.dtype == lp.dtype and lf.shape == lp.shape
            err = (lp.float() - lf.float()).abs().max() / lp.float().abs().max()
            assert err < TOL[dtype], (i, err.item())
            t = lp.argmax(-1, keepdim=True)
    if dtype == torch.float32:  # and the whole generation gives the same tokens
        assert torch.equal(fu.generate(ids, 16), py.generate(ids, 16))


def test_bf16_int4_weight_only_uses_the_bf16_kernel(tmp_path, tokenizer):
    """A bf16 W4A16 model takes the bf16-activation int4 kernel inside the fused step (kind 3), as the
    deployed linears do (its logits: test_fused_step_logits_equal_python_step)."""
    from mmcompress.quant.kernels import cpu

    if not cpu.bf16_available():
        pytest.skip("no AVX512_BF16")
    from mmcompress.runtime.fused import _lin_args

    model, tok, py, fu = _engines(tmp_path, tokenizer, "llama", "w4a16", torch.bfloat16)
    for mod in (fu.layers[0].q, fu.layers[0].mlp.gate_proj, fu.layers[0].down):
        assert _lin_args(mod, torch.bfloat16, None)[1][0] == 3


def test_unsupported_layers_fall_back_with_a_notice_only_when_asked(tmp_path, tokenizer, capsys):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    model.model.layers[1].mlp.down_proj = torch.nn.Sequential(model.model.layers[1].mlp.down_proj)
    e = DecodeEngine(model, max_len=16)
    assert e.path == "fast" and not e.fused
    assert capsys.readouterr().err == ""
    e = DecodeEngine(model, max_len=16, fused=True)
    assert not e.fused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fused decode step unavailable" in err[0] and "Sequential" in err[0]
    ids = torch.randint(0, len(tok) - 10, (1, 5), generator=torch.Generator().manual_seed(2))
    assert e.generate(ids, 4).shape == (1, 9)


def test_generation_reuses_the_plan_across_calls(tmp_path, tokenizer):
    model, tok, py, fu = _engines(tmp_path, tokenizer, "llama", "w8a8", torch.float32)
    a = torch.randint(0, len(tok) - 10, (1, 7), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, len(tok) - 10, (1, 11), generator=torch.Generator().manual_seed(4))
    first = fu.generate(a, 12)
    plan = fu._fused.plan
    fu.generate(b, 20)
    assert fu._fused.plan == plan and torch.equal(fu.generate(a, 12), first)
    assert torch.equal(first, py.generate(a, 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["bf16", "int8"])
def test_packed_head_logits_within_its_rounding_bound(tmp_path, tokenizer, head, dtype):
    """head="bf16" / "int8": the fused step's own packed copy of the (tied) LM head.  Per logit the change
    against the model's head is at most the head's rounding — bf16: |dw| <= 2^-9 |w|, so
    |dy| <= 2^-9 sum |w x| (bound used: 2^-8, for the fp32 sums); int8 per row: |dw| <= s/2 with
    s = max|w| / 127, so |dy| <= s/2 sum |x| — plus the fused step's own round-off (TOL)."""
    model, tok, py, _ = _engines(tmp_path, tokenizer, "qwen2", "w8a8", dtype)
    fu = DecodeEngine(model, max_len=40, head=head)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(5))
    xs = []
    hook = py.head.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().float().reshape(-1)))
    W = py.head.weight.detach().float()
    worst = 0.0
    try:
        with torch.no_grad():
            for e in (py, fu):
                e._reset()
                e._forward(ids, 0)
            t = torch.tensor([[5]])
            for i in range(16):
                lp, lf = py._step(t, 9 + i), fu._step(t, 9 + i)
                x = xs[-1]
                bound = (2.0 ** -8 * (W.abs() @ x.abs()) if head == "bf16"
                         else W.abs().amax(1) / 254 * x.abs().sum())
                tol = TOL[dtype] * lp.float().abs().max()
                err = (lp.float() - lf.float()).abs()[0]
                assert (err <= bound + tol).all(), (i, (err - bound).max().item())
                worst = max(worst, (err / (bound + tol)).max().item())
                t = lp.argmax(-1, keepdim=True)
    finally:
        hook.remove()
    assert fu._fused.head == ("model" if (head, dtype) == ("bf16", torch.bfloat16) else head)
    assert worst > 0 or fu._fused.head == "model"  # the packed head does change the logits (not a no-op)
    per_weight = {"bf16": 2, "int8": 1}[head]  # bytes the step reads per head weight (+ int8: a scale per row)
    assert W.numel() * per_weight <= fu._fused.head_bytes <= W.numel() * per_weight + 8 * W.shape[0]


def test_int8_rows_round_to_nearest_per_row():
    from mmcompress.runtime.fused import int8_rows

    w = torch.randn(37, 128, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 37)[:, None]
    w[5] = 0
    q, s = int8_rows(w)
    assert q.dtype == torch.int8 and s.shape == (37, 1) and q.abs().max() == 127
    assert ((q.float() * s - w).abs() <= s / 2 + 1e-7).all() and (q[5] == 0).all()


def test_packed_head_without_the_fused_step_says_so(tmp_path, tokenizer, capsys):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    e = DecodeEngine(model, max_len=16, fused=False, head="int8")
    assert not e.fused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the fused decode step" in err[0]
    with pytest.raises(ValueError, match="unknown head"):
        DecodeEngine(model, max_len=16, head="fp8")
