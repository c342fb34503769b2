"""``mmcompress_fq`` (``quant/kernels/fake_quant.cpp``): MASQuant's smoothed weight fake quantization
``Q(W ⊙ s)`` and its gradient for ``s``, against the torch chain ``fake_quantize_weight(W * s, ...)``.

Values: bit for bit.  Gradient: the same formulas with three sums in float64 instead of float32 in ATen's
order (``Σ_k g q`` and ``Σ_k (gΔ)(x/Δ)/Δ`` per group, ``Σ_r gx_rk W_rk`` per column).  The chain's float32
sum over the ``N`` rows is within ``γ_N = N u / (1 − N u)`` (``u = 2⁻²⁴``) of the exact sum relative to
``Σ_r |gx_rk W_rk|``; the kernel's is within ``u`` of it; the per-group sums reach the gradient only at
each group's maxima, as ``Δ``'s share, at most the same relative size against their own ``Σ |terms|``.  So
the sound bound per column is ``2 γ_{N+K}`` times ``T_k = Σ_r |g_rk W_rk| + Σ_r |gΔ_r / qmax| |W_rk|``.
ATen sums float32 in a cascade (error ``O(u log N)``, not ``N u``), so the test also holds the difference to
``32 u T_k`` (measured: at most 1.4 u T_k over these cases); dropping ``Δ``'s share at the maxima breaks
the sound bound by orders of magnitude (``test_the_bound_catches_a_missing_step_size_share``)."""

import pytest
import torch

from mmcompress.quant.kernels import fake_quant_cpu as fq
from mmcompress.quant.quantizer import fake_quantize_weight

U = 2.0**-24


def _need_kernel():
    if not fq.available():
        pytest.skip(f"no fake-quant kernel here ({fq.error()})")


def _chain(w, s0, g, bits, group):
    s = s0.clone().requires_grad_()
    y = fake_quantize_weight(w * s, bits, group, True)
    (y * g).sum().backward()
    return y.detach(), s.grad


def _kernel(w, s0, g, bits, group):
    s = s0.clone().requires_grad_()
    y = fq.smoothed_fake_quant_weight(w, s, bits, group)
    (y * g).sum().backward()
    return y.detach(), s.grad


def _terms(w, s, g, bits, group):
    """Per column ``T_k = Σ_r |g_rk W_rk| + Σ_r |gΔ_r / qmax| |W_rk|`` (see the module docstring)."""
    n, k = w.shape
    gs = k if group <= 0 else group
    qmax = 2 ** (bits - 1) - 1
    x = (w * s).double().reshape(n, -1, gs)
    amax = x.abs().amax(-1, keepdim=True)
    d = (amax / qmax).clamp(min=1e-10)
    gg = g.double().reshape(n, -1, gs)
    q = torch.round(x / d)
    g_delta = (gg * q).abs().sum(-1, keepdim=True) + (gg * d * (x / d / d)).abs().sum(-1, keepdim=True)
    share = (g_delta / qmax).expand_as(x).reshape(n, k)
    return (g.double() * w.double()).abs().sum(0) + (share * w.double().abs()).sum(0)


def _bound(w, s, g, bits, group):
    """The sound bound ``2 γ_{N+K} T_k``."""
    n, k = w.shape
    gamma = (n + k) * U / (1 - (n + k) * U)
    return 2 * gamma * _terms(w, s, g, bits, group)


def _cases(gen):
    w_ties = torch.randn(48, 128, generator=gen)
    w_ties[:, 5] = w_ties.abs().amax(1) * 1.0  # the row maximum twice (count 2), positive
    w_ties[:, 9] = -w_ties[:, 5]  # and its negative: three maxima, two signs
    w_zero = torch.randn(16, 64, generator=gen)
    w_zero[3] = 0.0  # a zero row: Δ = eps, every element a maximum with sgn 0
    w_tiny = torch.randn(8, 64, generator=gen) * 1e-12  # Δ clamped at eps: no gradient through Δ
    return [
        (torch.randn(1536, 576, generator=gen) * 0.02, 4, 0),
        (torch.randn(576, 576, generator=gen), 8, 0),
        (torch.randn(192, 576, generator=gen) * 0.1, 4, 64),
        (torch.randn(7, 33, generator=gen), 3, 0),
        (torch.randint(-20, 20, (32, 256), generator=gen) * 0.25, 4, 128),  # exact halves: ties in rounding
        (w_ties, 4, 0), (w_zero, 4, 0), (w_tiny, 8, 32), (torch.randn(5, 40, generator=gen), 2, 8),
    ]


def test_values_bit_for_bit_and_the_gradient_within_the_summation_bound():
    _need_kernel()
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for w, bits, group in _cases(gen):
        s0 = torch.rand(w.shape[1], generator=gen) + 0.5
        g = torch.randn(w.shape, generator=gen)
        y_ref, g_ref = _chain(w, s0, g, bits, group)
        y, gs = _kernel(w, s0, g, bits, group)
        assert torch.equal(y, y_ref), (w.shape, bits, group)
        err = (gs.double() - g_ref.double()).abs()
        bound = _bound(w, s0, g, bits, group)
        assert (err <= bound).all(), (w.shape, bits, group, float((err / bound).max()))
        tight = 32 * U * _terms(w, s0, g, bits, group)
        assert (err <= tight).all(), (w.shape, bits, group, float((err / tight).max()))
        worst = max(worst, float((err / tight).max()))
    assert worst > 0  # the two do sum differently (else this test would not see the kernel's sums)


def test_the_bound_catches_a_missing_step_size_share():
    """The amax part of the gradient left out: far outside the bound (the bound can fail)."""
    _need_kernel()
    gen = torch.Generator().manual_seed(1)
    w, s0, g = torch.randn(256, 576, generator=gen), torch.rand(576, generator=gen) + 0.5, torch.randn(256, 576, generator=gen)
    _, g_ref = _chain(w, s0, g, 4, 0)
    ste = (g * w).sum(0)  # the straight-through part alone
    assert ((ste.double() - g_ref.double()).abs() > _bound(w, s0, g, 4, 0)).any()


def test_the_gradient_does_not_depend_on_the_thread_count():
    _need_kernel()
    gen = torch.Generator().manual_seed(2)
    w, s0, g = torch.randn(700, 320, generator=gen), torch.rand(320, generator=gen) + 0.5, torch.randn(700, 320, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(w, s0, g, 4, 0)
        torch.set_num_threads(max(2, threads))
        many = _kernel(w, s0, g, 4, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_non_finite_and_unsupported_inputs_take_the_chain():
    """NaN/inf in W ⊙ s, asymmetric, padded groups, other dtypes, a weight that needs a gradient: the torch
    chain's values and gradients exactly."""
    _need_kernel()
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(12, 64, generator=gen)
    s0 = torch.rand(64, generator=gen) + 0.5
    g = torch.randn(12, 64, generator=gen)
    w_inf = w.clone()
    w_inf[2, 7] = float("inf")
    for ww, bits, group, sym in ((w_inf, 4, 0, True), (w, 4, 0, False), (w, 4, 48, True), (w.double(), 4, 0, True),
                                 (w, 16, 0, True)):
        s = s0.clone().to(ww.dtype).requires_grad_()
        y = fq.smoothed_fake_quant_weight(ww, s, bits, group, sym)
        (y * g.to(ww.dtype)).sum().backward()
        s2 = s0.clone().to(ww.dtype).requires_grad_()
        y2 = fake_quantize_weight(ww * s2, bits, group, sym)
        (y2 * g.to(ww.dtype)).sum().backward()
        assert torch.equal(y.detach().nan_to_num(), y2.detach().nan_to_num()), (bits, group, sym, ww.dtype)
        assert torch.equal(s.grad.nan_to_num(), s2.grad.nan_to_num()), (bits, group, sym, ww.dtype)
    wg = w.clone().requires_grad_()
    s = s0.clone().requires_grad_()
    fq.smoothed_fake_quant_weight(wg, s, 4).sum().backward()
    assert wg.grad is not None and s.grad is not None  # the chain: a gradient for the weight too


def test_masquant_training_uses_the_kernel(monkeypatch):
    """MASTrainLinear's per-modality weight goes through the kernel (once per modality of a sample), and the
    training step's gradient reaches the smoothing rows."""
    _need_kernel()
    from mmcompress.models.modality import modality_context
    from mmcompress.quant.methods.masquant import MASTrainLinear
    from mmcompress.quant.quantizer import SCHEMES

    calls = []
    real = fq._SmoothedWeightFakeQuant.apply

    def spy(s, w, *a):
        calls.append(tuple(w.shape))
        return real(s, w, *a)

    monkeypatch.setattr(fq._SmoothedWeightFakeQuant, "apply", spy)
    gen = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(64, 32, bias=False)
    tl = MASTrainLinear(lin, SCHEMES["w4a8"], torch.ones(3, 64))
    x = torch.randn(1, 10, 64, generator=gen)
    ids = torch.tensor([[0] * 6 + [2] * 4])  # text and audio tokens
    with modality_context(ids):
        tl(x).sum().backward()
    assert calls == [(32, 64)] * 2
    assert tl.smoothing.grad[0].abs().sum() > 0 and tl.smoothing.grad[2].abs().sum() > 0
    assert tl.smoothing.grad[1].abs().sum() == 0  # no image token
