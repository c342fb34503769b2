"""Uniform fake quantizers: small pure functions, no model knowledge.

Weights (``W ∈ R^{out×in}``), per output channel (``group_size = 0``) or per group of ``g``
consecutive input channels, min–max (round-to-nearest) statistics:

* symmetric:  ``Δ = max|w| / (2^{b−1} − 1)``,  ``q = clamp(round(w/Δ), −(2^{b−1}−1), 2^{b−1}−1)``,
  ``ŵ = q·Δ`` — e.g. 4 bits gives the 15 levels ``{−7..7}·Δ``;
* asymmetric: ``Δ = (max − min) / (2^b − 1)``, ``z = round(−min/Δ)``,
  ``q = clamp(round(w/Δ) + z, 0, 2^b − 1)``, ``ŵ = (q − z)·Δ``; the range always contains 0
  (``min ≤ 0 ≤ max``, the GPTQ convention), so zero-padding a partial last group is harmless and the
  zero point fits the code range.

Activations: per token (last dimension), dynamic, symmetric ``b``-bit absmax.

``bits >= 16`` switches a quantizer off (identity).  Rounding uses the straight-through estimator
``round_ste(x) = x + stopgrad(round(x) − x)``; the min/max statistics are not detached, so gradients
also reach the step size through them (OmniQuant's learnable-equivalent-transform setting).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..options import MAX_BITS, MIN_BITS  # noqa: F401  (re-exported: the bit range quantizers accept)
_EPS = 1e-10  # the smallest step size; raised to the dtype's smallest normal where that is larger (fp16)


def _eps(dtype: torch.dtype) -> float:
    return max(_EPS, torch.finfo(dtype).tiny) if dtype.is_floating_point else _EPS


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def absmax(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """``max |x|`` along ``dim``, exactly, without a ``|x|`` temporary: ``max(max x, −min x)``.  Two
    reductions rather than ``torch.aminmax``, which on torch 2.13's CPU build is 5-10x slower than the
    two together (and than ``x.abs().amax()``) for the reductions used here (docs/runtime.md, "aminmax")."""
    return torch.maximum(x.amax(dim, keepdim=keepdim), x.amin(dim, keepdim=keepdim).neg())


class _AbsmaxFakeQuant(torch.autograd.Function):
    """``clamp(round_ste(x/Δ), −q, q)·Δ`` with ``Δ = clamp(max|x|/q, min=eps)`` over the last dimension,
    as one autograd node: the same values and the same gradients, bit for bit, as the composition of
    torch ops it replaces (:func:`_absmax_fake_quant_reference`; tests/test_quantizer.py compares them
    with ``torch.equal``), in about half the passes over ``x`` (calibration that trains through the
    quantizer, MASQuant's, spends most of its time here).

    Why the values agree: ``x + (round(x) − x)`` is ``round(x)`` exactly (the difference is exact by
    Sterbenz's lemma, and the sum is representable).  The backward replays autograd's formulas for
    ``mul``, ``clamp``, ``div``, ``clamp_min``, ``amax`` and ``abs`` (derivatives.yaml) op for op: the
    same elementwise operations on the same operands and the same reductions (``sum`` over the last
    dimension); where autograd adds two contributions to one gradient, float addition is commutative.
    ``(−g)·y`` summed is ``−Σ g·y`` exactly (rounding is symmetric), and the ``amax`` part, zero
    except at each row's maxima, is added there only (elsewhere autograd adds a signed zero, which may
    turn a ``−0.0`` into ``+0.0``: equal as numbers, the one difference)."""

    @staticmethod
    def forward(ctx, x, qmax, eps):
        ax = x.abs()
        amax = ax.amax(-1, keepdim=True)
        pre = amax / qmax
        scale = pre.clamp(min=eps)
        q = torch.div(x, scale).round_()  # r = x/Δ, rounded in place (the backward recomputes r)
        # With a finite max|x| the clamp is the identity: |x/Δ| ≤ q(1 + 2u) rounds to at most q.  Then its
        # backward mask is all true and neither is computed; otherwise both are, as autograd would.
        mask = None
        if not bool(torch.isfinite(amax).all()):
            mask = q.abs() <= qmax  # clamp's backward mask, on its input (NaN: False)
            q.clamp_(-qmax, qmax)
        out = q * scale
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, ax, q, amax, pre, scale, mask)
            ctx.qmax, ctx.eps = qmax, eps
        return out

    @staticmethod
    def backward(ctx, g):
        x, ax, q, amax, pre, scale, mask = ctx.saved_tensors
        qmax, eps = ctx.qmax, ctx.eps
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        grad_s = (g * q).sum(-1, keepdim=True)  # out = q·Δ, the Δ part (summed to Δ's shape)
        grad_r = g * scale  # out = q·Δ, the q part; clamp passes it where its mask is true
        if mask is not None:
            grad_r = torch.where(mask, grad_r, zero)
        grad_x = grad_r / scale  # r = x/Δ, the x part (round_ste passes the gradient through)
        t = torch.div(x, scale).div_(scale)  # (x/Δ)/Δ
        grad_s = grad_s + (-grad_r.mul_(t).sum(-1, keepdim=True))  # r = x/Δ, the Δ part: −g·(x/Δ)/Δ
        grad_s = torch.where(pre >= eps, grad_s, zero)  # clamp_min
        grad_amax = grad_s / qmax
        # amax's backward, (g/count)·1[|x| = max]·sgn(x), is zero off the maxima: added only where it is not
        hit = ax == amax
        count = hit.sum(-1, keepdim=True)
        idx = hit.nonzero(as_tuple=True)
        per_row = (grad_amax / count).expand_as(x)[idx]
        grad_x.index_put_(idx, per_row * x[idx].sgn(), accumulate=True)
        return grad_x, None, None


def _absmax_fake_quant_reference(x: torch.Tensor, qmax: int, eps: float) -> torch.Tensor:
    """The composition :class:`_AbsmaxFakeQuant` computes (kept as the reference the tests compare to)."""
    scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=eps)
    return torch.clamp(round_ste(x / scale), -qmax, qmax) * scale


def absmax_fake_quant(x: torch.Tensor, qmax: int, eps: float) -> torch.Tensor:
    """Symmetric absmax fake quantization over the last dimension (see :class:`_AbsmaxFakeQuant`)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AbsmaxFakeQuant.apply(x, qmax, eps)
    with torch.no_grad():
        scale = _absmax_scale(x, qmax, eps)
        return torch.div(x, scale).round_().clamp_(-qmax, qmax).mul_(scale)


def _absmax_scale(x: torch.Tensor, qmax: int, eps: float) -> torch.Tensor:
    """Per-row step size ``clamp(max|x| / q, min=eps)`` over the last dimension (``[..., 1]``)."""
    return (absmax(x, -1, keepdim=True) / qmax).clamp(min=eps)


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer between {MIN_BITS} and {MAX_BITS} (16 = no quantization), got {bits!r}")
    return bits


@dataclass(frozen=True)
class QuantScheme:
    """Bit widths and granularity of one quantization setting (e.g. W4A8)."""

    wbits: int = 8
    abits: int = 8
    group_size: int = 0  # 0 = per output channel
    sym: bool = True

    def __post_init__(self):
        check_bits(self.wbits, "weight bits")
        check_bits(self.abits, "activation bits")
        if self.group_size < 0:
            raise ValueError(f"group size must be >= 0 (0 = per channel), got {self.group_size}")

    @property
    def name(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        s = "" if self.sym else "-asym"
        return f"w{self.wbits}a{self.abits}{g}{s}"

    @property
    def weight_only(self) -> bool:
        return self.abits >= 16

    def to_dict(self) -> dict:
        return asdict(self)


SCHEMES: dict[str, QuantScheme] = {
    "w8a8": QuantScheme(8, 8, 0, True),
    "w4a8": QuantScheme(4, 8, 0, True),
    "w4a6": QuantScheme(4, 6, 0, True),
    "w4a16": QuantScheme(4, 16, 128, False),
    "w8a16": QuantScheme(8, 16, 0, True),
    "fp": QuantScheme(16, 16, 0, True),
}


def resolve_scheme(name: str | None = None, *, wbits=None, abits=None, group_size=None, sym=None) -> QuantScheme:
    """A named scheme with optional explicit overrides."""
    if name is None:
        base = SCHEMES["w8a8"]
    elif name.lower() in SCHEMES:
        base = SCHEMES[name.lower()]
    else:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return QuantScheme(
        wbits=base.wbits if wbits is None else wbits,
        abits=base.abits if abits is None else abits,
        group_size=base.group_size if group_size is None else group_size,
        sym=base.sym if sym is None else sym,
    )


# -- weights ---------------------------------------------------------------------------------


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """View ``[out, in]`` as ``[out, n_groups, g]`` (zero-padding a partial last group)."""
    out_f, in_f = w.shape
    g = in_f if group_size <= 0 else group_size
    pad = (-in_f) % g
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, -1, g), pad


def weight_qparams(w: torch.Tensor, bits: int, group_size: int = 0, sym: bool = True):
    """Step size ``Δ`` and zero point ``z`` (both ``[out, n_groups]``, float) of ``w``."""
    wg, _ = _grouped(w, group_size)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = absmax(wg, -1) / qmax
        zero = torch.zeros_like(scale)
    else:
        qmax = 2**bits - 1
        wmin = wg.amin(-1).clamp(max=0)
        wmax = wg.amax(-1).clamp(min=0)
        scale = (wmax - wmin) / qmax
        zero = torch.round(-wmin / scale.clamp(min=_eps(scale.dtype)))
    return scale.clamp(min=_eps(scale.dtype)), zero


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int = 0, sym: bool = True) -> torch.Tensor:
    """Quantize-dequantize ``w`` (differentiable through STE and through the statistics)."""
    if bits >= 16:
        return w
    wg, pad = _grouped(w, group_size)
    if sym:
        out = absmax_fake_quant(wg, 2 ** (bits - 1) - 1, _eps(w.dtype))
    else:
        scale, zero = weight_qparams(w, bits, group_size, sym)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q = torch.clamp(round_ste(wg / s) + z, 0, 2**bits - 1)
        out = (q - z) * s
    out = out.reshape(w.shape[0], -1)
    return out[:, : w.shape[1]] if pad else out


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = 0, sym: bool = True):
    """Integer codes (int8 tensor, ``[out, in]``), step sizes and zero points of ``w``."""
    with torch.no_grad():
        if sym and w.dtype in (torch.bfloat16, torch.float16):
            # max|w| is exact in the weight's own dtype: one pass over the half-size tensor, same step sizes
            scale = (absmax(_grouped(w, group_size)[0], -1).float() / (2 ** (bits - 1) - 1)).clamp(min=_EPS)
            zero = torch.zeros_like(scale)
            w = w.float()
        else:
            w = w.float()
            scale, zero = weight_qparams(w, bits, group_size, sym)
        wg, pad = _grouped(w, group_size)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q = torch.div(wg, s).round_()  # in place from here: one temporary the size of w
        if sym:
            qmax = 2 ** (bits - 1) - 1
            q.clamp_(-qmax, qmax)
        else:
            q.add_(z).clamp_(0, 2**bits - 1)
        q = q.reshape(w.shape[0], -1)[:, : w.shape[1]]
        # asymmetric codes live in [0, 2^b - 1]; shift them to int8 range for storage
        if not sym:
            q = q.sub_(2 ** (bits - 1))
        return q.to(torch.int8), scale, zero


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    q = codes.float()
    if not sym:
        q = q + 2 ** (bits - 1)
    out_f, in_f = q.shape
    qg, pad = _grouped(q, group_size)
    w = (qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    w = w.reshape(out_f, -1)
    return w[:, :in_f] if pad else w


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] two per byte along the last dimension (padded to even)."""
    c = codes.to(torch.int16) & 0xF
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes ``[..., n]``.  The bytes are read as int8, so arithmetic
    right shifts sign-extend each nibble: ``(b << 4) >> 4`` is the low one, ``b >> 4`` the high one."""
    p = packed.view(torch.int8)
    c = torch.empty(*p.shape, 2, dtype=torch.int8, device=p.device)  # [..., byte, nibble]: no stack copy
    torch.bitwise_right_shift(p << 4, 4, out=c[..., 0])
    torch.bitwise_right_shift(p, 4, out=c[..., 1])
    c = c.view(*p.shape[:-1], -1)
    return c if c.shape[-1] == n else c[..., :n].contiguous()


# -- activations -----------------------------------------------------------------------------


def activation_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token step size ``max|x_t| / (2^{b−1} − 1)`` (``[..., 1]``, in ``x``'s dtype)."""
    return _absmax_scale(x, 2 ** (bits - 1) - 1, _eps(x.dtype))


def fake_quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token dynamic symmetric fake quantization over the last dimension."""
    if bits >= 16:
        return x
    return absmax_fake_quant(x, 2 ** (bits - 1) - 1, _eps(x.dtype))


def quantize_activation(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int8, on the ``±(2^{b−1}−1)`` grid) and per-token step sizes of ``x``: the same
    arithmetic as :func:`fake_quantize_activation`, so ``codes · scale`` is its output."""
    qmax = 2 ** (bits - 1) - 1
    scale = activation_scale(x, bits)
    return torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int8), scale
