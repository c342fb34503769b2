"""MASQuant's smoothed weight fake quantization ``Q(W ⊙ s)`` with its gradient for ``s``, one pass per row
(``fake_quant.cpp``), for training.

:func:`smoothed_fake_quant_weight` ``(w, s, bits, group_size)`` is ``fake_quantize_weight(w * s, bits,
group_size, sym=True)`` for a weight ``w`` that is not trained and a smoothing row ``s`` that is: the same
values bit for bit, and the gradient for ``s`` of the same formulas (straight-through rounding, the
step size's gradient through ``max |W ⊙ s|``) with its three sums accumulated in float64, so it equals
the torch chain's to float32 round-off of those sums.  The chain takes about twenty passes over the
weight per call in autograd's backward; MASQuant calls it for every smoothed linear, every modality of a
sample and every training step, which made it most of the calibration's time.

Symmetric float32 weights on the CPU with groups that divide the row, at most 8 bits; anything else
(asymmetric, a padded group, another dtype or device, a weight that needs a gradient, no compiler,
``MMCOMPRESS_NO_CPU_KERNEL``) takes the torch chain, as does a call whose ``W ⊙ s`` holds NaN or inf.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...sparse.kernels.cpu import extension_name, load_extension
from ..quantizer import fake_quantize_weight

_SRC = Path(__file__).with_name("fake_quant.cpp")
_STATE: dict = {"loaded": False, "error": None}


def build_name() -> str:
    return extension_name("mmcompress_fake_quant", _SRC)


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the extension; ``True`` if ``torch.ops.mmcompress_fq`` is usable."""
    return load_extension(_STATE, build_name, _SRC, lambda: torch.ops.mmcompress_fq.smoothed_weight_fq, verbose)


def available() -> bool:
    return load()


def error() -> str | None:
    return _STATE["error"]


def _kernel_takes(w: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, sym: bool) -> bool:
    k = w.shape[-1]
    return (sym and 2 <= bits <= 8 and w.dim() == 2 and s.dim() == 1 and s.shape[0] == k
            and w.dtype == torch.float32 and s.dtype == torch.float32 and w.device.type == "cpu"
            and s.device.type == "cpu" and not w.requires_grad and (group_size <= 0 or k % group_size == 0)
            and available())


class _SmoothedWeightFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, w, bits, group):
        w, s = w.contiguous(), s.contiguous()
        qmax = float(2 ** (bits - 1) - 1)
        out, q, scale, amax, ok = torch.ops.mmcompress_fq.smoothed_weight_fq(w, s, qmax, group)
        ctx.bits, ctx.qmax, ctx.group, ctx.ok = bits, qmax, group, ok
        ctx.save_for_backward(s, w, q, scale, amax)
        if not ok:  # NaN or inf in W ⊙ s: the torch chain's values (and, in backward, its gradient)
            return fake_quantize_weight(w * s, bits, group, True)
        return out

    @staticmethod
    def backward(ctx, g):
        s, w, q, scale, amax = ctx.saved_tensors
        if not ctx.ok:
            with torch.enable_grad():
                s_ = s.detach().requires_grad_()
                (gs,) = torch.autograd.grad(fake_quantize_weight(w * s_, ctx.bits, ctx.group, True), s_, g)
            return gs, None, None, None
        gs = torch.ops.mmcompress_fq.smoothed_weight_fq_backward(g, w, s, q, scale, amax, ctx.qmax, ctx.group)
        return gs, None, None, None


def smoothed_fake_quant_weight(w: torch.Tensor, s: torch.Tensor, bits: int, group_size: int = 0,
                               sym: bool = True) -> torch.Tensor:
    """``fake_quantize_weight(w * s, bits, group_size, sym)`` (``w`` ``[out, in]``, ``s`` ``[in]``), through
    the kernel where it takes the call (see the module docstring)."""
    if bits >= 16 or not _kernel_takes(w, s, bits, group_size, sym):
        return fake_quantize_weight(w * s, bits, group_size, sym)
    return _SmoothedWeightFakeQuant.apply(s, w, bits, group_size)
