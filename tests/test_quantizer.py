import pytest
import torch

from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.quantizer import (
    QuantScheme,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    pack_int4,
    quantize_weight,
    resolve_scheme,
    unpack_int4,
)


def test_symmetric_4bit_grid_is_minus7_to_7_times_step():
    w = torch.randn(8, 64)
    wq = fake_quantize_weight(w, 4, 0, True)
    step = w.abs().amax(1, keepdim=True) / 7
    levels = wq / step
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.round().abs().max() == 7
    assert levels.round().unique().numel() <= 15
    # the largest-magnitude weight of every row is exactly representable
    idx = w.abs().argmax(1)
    assert torch.allclose(wq.gather(1, idx[:, None]), w.gather(1, idx[:, None]), rtol=1e-5)


def test_asymmetric_grid_has_2_pow_b_levels_and_contains_zero():
    w = torch.randn(4, 128) + 0.3
    codes, scale, zero = quantize_weight(w, 4, 0, False)
    assert codes.min() >= -8 and codes.max() <= 7  # [0, 15] stored shifted by 8
    wq = dequantize_weight(codes, scale, zero, 4, 0, False)
    assert torch.allclose(wq, fake_quantize_weight(w, 4, 0, False), atol=1e-6)
    assert ((wq - 0).abs() < 1e-7).any(dim=1).all() or (zero >= 0).all()
    assert (zero >= 0).all() and (zero <= 15).all()


@pytest.mark.parametrize("in_features,group", [(256, 128), (576, 128), (96, 32)])
def test_group_shapes_and_error_drops_with_groups(in_features, group):
    w = torch.randn(16, in_features)
    codes, scale, zero = quantize_weight(w, 4, group, False)
    assert codes.shape == w.shape
    assert scale.shape == (16, -(-in_features // group))
    err_group = (fake_quantize_weight(w, 4, group, False) - w).pow(2).mean()
    err_chan = (fake_quantize_weight(w, 4, 0, False) - w).pow(2).mean()
    assert err_group < err_chan


def test_ste_gradient_passes_through():
    w = torch.randn(4, 16, requires_grad=True)
    fake_quantize_weight(w, 4, 0, True).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    x = torch.randn(3, 16, requires_grad=True)
    (fake_quantize_activation(x, 8) * torch.arange(16.0)).sum().backward()
    # identity gradient everywhere except at each token's absmax entry (which also feeds the step size)
    not_max = torch.ones_like(x, dtype=torch.bool).scatter(1, x.abs().argmax(1, keepdim=True), False)
    assert torch.allclose(x.grad[not_max], torch.arange(16.0).expand(3, 16)[not_max], atol=1e-5)


def test_activation_per_token_grid():
    x = torch.randn(5, 32) * torch.tensor([1.0, 10, 100, 0.1, 3])[:, None]
    xq = fake_quantize_activation(x, 8)
    step = x.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(xq / step, (xq / step).round(), atol=1e-3)
    assert (xq - x).abs().max(1).values.le(step.squeeze(1) / 2 + 1e-6).all()
    assert fake_quantize_activation(x, 16) is x


def test_int4_pack_roundtrip():
    c = torch.randint(-8, 8, (5, 33), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(c), 33), c)


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_bad_bits_rejected(bits):
    with pytest.raises(ValueError, match="between 2 and 16"):
        QuantScheme(wbits=bits)


def test_scheme_presets_and_overrides():
    s = resolve_scheme("w4a16")
    assert (s.wbits, s.abits, s.group_size, s.sym) == (4, 16, 128, False)
    assert resolve_scheme("w4a8", abits=6).name == "w4a6"
    with pytest.raises(ValueError):
        resolve_scheme("w3a3")


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16", "w4a8"])
def test_quantlinear_pack_matches_fake_quant(scheme):
    lin = torch.nn.Linear(200, 24)
    q = QuantLinear.from_linear(lin, resolve_scheme(scheme))
    x = torch.randn(2, 7, 200)
    y_float = q(x)
    q.pack()
    assert q.packed and not hasattr(q, "weight")
    assert torch.allclose(q(x), y_float, atol=1e-5)
    rebuilt = QuantLinear.from_spec(q.spec())
    rebuilt.load_state_dict(q.state_dict())
    assert torch.equal(rebuilt(x), q(x))


def _quant_cases():
    """Inputs that exercise the absmax quantizer's corners: ties of max|x| (split gradient), an all-zero
    row (step size clamped to eps: no gradient to the statistics), values on the rounding grid, several
    bit widths, group views with padding, float32 and float64."""
    g = torch.Generator().manual_seed(0)
    for i in range(48):
        shape = [(7, 33), (3, 5, 64), (64, 1, 96), (12, 4, 32), (1, 1), (40, 96)][i % 6]
        dtype = torch.float64 if i % 5 == 0 else torch.float32
        x = torch.randn(*shape, generator=g, dtype=dtype) * 10.0 ** (i % 5 - 2)
        if i % 7 == 0:
            x[..., 0] = x.abs().amax(-1)
            x[..., -1] = -x[..., 0]
        if i % 11 == 0:
            x[0] = 0
        if i % 13 == 0:
            x = torch.round(x * 4) / 4
        yield x, (torch.rand(shape[-1], generator=g, dtype=dtype) + 0.5), [7, 127, 31, 1][i % 4], torch.randn(*shape, generator=g, dtype=dtype)


def test_absmax_fake_quant_is_the_composition_bit_for_bit():
    """The one-node quantizer gives the values and the gradients (to its input and, through ``x·s``, to a
    smoothing vector) of the torch-op composition it replaces, exactly: MASQuant's trained smoothing
    vectors do not move by a bit."""
    from mmcompress.quant.quantizer import _absmax_fake_quant_reference, _eps, absmax_fake_quant

    for x, s, qmax, g in _quant_cases():
        eps = _eps(x.dtype)
        got = []
        for f in (_absmax_fake_quant_reference, absmax_fake_quant):
            sp = s.clone().requires_grad_(True)
            xs = (x * sp).detach().requires_grad_(True)
            y = f(xs, qmax, eps)
            y.backward(g)
            y2 = f(x * sp, qmax, eps)
            y2.backward(g)
            got.append((y.detach(), xs.grad, sp.grad))
        with torch.no_grad():
            got.append((absmax_fake_quant(x * s, qmax, eps),) * 3)
        (ref_y, ref_gx, ref_gs), (y, gx, gs), (y_ng, _, _) = got
        assert torch.equal(y, ref_y) and torch.equal(y_ng, ref_y)
        assert torch.equal(gx, ref_gx) and torch.equal(gs, ref_gs)
        assert gx.abs().sum() > 0


def test_fake_quantize_weight_and_activation_match_the_composition():
    """Group views (with a padded last group) and per-token activations: values and gradients."""
    from mmcompress.quant.quantizer import _absmax_fake_quant_reference, _eps

    base = torch.randn(48, 80)
    for group in (0, 32):
        got = []
        for fq in (lambda w: fake_quantize_weight(w, 4, group, True),
                   lambda w: _absmax_fake_quant_reference(
                       torch.nn.functional.pad(w, (0, (-80) % group)).reshape(48, -1, group) if group else w[:, None],
                       7, _eps(w.dtype)).reshape(48, -1)[:, :80]):
            w = base.clone().requires_grad_(True)
            y = fq(w)
            (y * torch.arange(80.0)).sum().backward()
            got.append((y.detach(), w.grad))
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    x = torch.randn(5, 80)
    assert torch.equal(fake_quantize_activation(x, 8), _absmax_fake_quant_reference(x, 127, _eps(x.dtype)))


def test_absmax_is_exact():
    from mmcompress.quant.quantizer import absmax

    x = torch.randn(30, 17)
    x[3, 4] = -100.0
    for dim in (0, -1):
        assert torch.equal(absmax(x, dim), x.abs().amax(dim))
    assert torch.isnan(absmax(torch.tensor([1.0, float("nan")]), 0))
