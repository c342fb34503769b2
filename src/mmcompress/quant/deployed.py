"""The deployed (integer) form of a packed quantized linear, and the load-time runtime choice.

:class:`IntLinear` holds only what a packed :class:`~mmcompress.quant.linear.QuantLinear` stores —
integer codes (int8, or int4 two per byte), step sizes, zero points, bias, smoothing rows — and runs
``y = int_matmul(x / s_m) + b`` (:mod:`.kernels`): integer codes × integer codes with int32
accumulation, scales applied afterwards.  It never materialises a float copy of its weight (the
weight-only prefill path builds one per call and drops it).  The buffers keep the packed
``QuantLinear``'s names and :meth:`spec` returns its spec, so a deployed model saves to the same
artifact.  Int4 codes that the CPU kernel runs are held tiled in memory
(:func:`~mmcompress.quant.kernels.tile_codes`: the same bytes in the order the kernel streams them) and
saved row-major; int8 codes with long rows (K >= 4096) stay row-major, which the decode step reads faster
(:func:`~mmcompress.quant.kernels.tiled_codes`).

:class:`IntMASLinear` is MASQuant's E17 on that path: every token goes through the one shared integer
weight with its own modality's smoothing row; image/audio tokens add ``(x/s_m) L_m R_m`` in floating
point; text tokens and decode steps pay nothing extra.

:func:`deploy` swaps every packed quantized linear of a model for its deployed form
(``runtime="int"``, the default of :func:`mmcompress.load`) or leaves the model as it is
(``"reference"``: the fake-quant forward).  A layer whose scheme has no integer path on its device
stays on the reference forward, and one line on stderr says so.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..sparse.joint import deploy as deploy_sparse  # Top-K + W8A8 on the sparse int8 kernel (CPU)
from ..specs import register_quant_module
from . import kernels
from .linear import QuantLinear, weight_input
from .methods.masquant import MASLinear, cmc_correction
from .quantizer import QuantScheme

RUNTIMES = ("int", "reference")


@register_quant_module  # saved under the spec of the layer it came from
class IntLinear(nn.Module):
    """Packed codes + scales (+ zero points) and an integer forward (gpt-fast style)."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.in_features, self.out_features, self.scheme = q.in_features, q.out_features, q.scheme
        self._spec = q.spec()
        codes = q.weight_codes
        if kernels.tiled_codes(q.scheme, q.in_features, q.out_features, codes.device):
            codes = kernels.tile_codes(codes)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", q.weight_scale)
        self.register_buffer("weight_zero", q.weight_zero)
        self.bias = q.bias
        self.register_buffer("input_smoothing", q.input_smoothing)
        self.input_sparsifier = q.input_sparsifier

    def spec(self) -> dict:
        return dict(self._spec)

    # the artifact holds row-major codes: tiled ones are un-tiled on save and tiled again on load
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight_codes"
        if key in destination and destination[key].dim() == 4:
            destination[key] = kernels.untile_codes(destination[key])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight_codes"
        v = state_dict.get(key)
        if self.weight_codes is not None and self.weight_codes.dim() == 4 and v is not None and v.dim() == 2:
            state_dict[key] = kernels.tile_codes(v) if v.shape[0] % kernels.TILE_ROWS == 0 and \
                v.shape[1] % kernels.TILE_BYTES == 0 else v  # a wrong shape is left for the shape check's error
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def correction(self, xs: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, ids = weight_input(self, x)
        y = kernels.int_matmul(xs.reshape(-1, self.in_features), self.weight_codes, self.weight_scale,
                               self.weight_zero, self.scheme, self.in_features)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        extra = self.correction(xs, ids)
        return y if extra is None else y + extra

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.name}, runtime=int"


@register_quant_module
class IntMASLinear(IntLinear):
    """MASQuant's deployed layer (E17) on the integer path."""

    def __init__(self, q: QuantLinear):
        super().__init__(q)
        self.register_buffer("cmc_left", getattr(q, "cmc_left", None))
        self.register_buffer("cmc_right", getattr(q, "cmc_right", None))

    def correction(self, xs, ids):
        return None if self.cmc_left is None else cmc_correction(xs, ids, self.cmc_left, self.cmc_right)


def _deployed_class(q: QuantLinear):
    """The deployed class for ``q``, or ``None`` (with the reason) when it stays on the reference path."""
    if not q.packed:
        return None, "not packed"
    if isinstance(q, MASLinear):
        return (None, "MASQuant split (research) form") if q.split else (IntMASLinear, "")
    if type(q) is not QuantLinear:
        return None, f"{type(q).__name__} has no deployed form"
    device = q.weight_codes.device
    if not kernels.has_kernel(q.scheme, device):
        return None, f"no integer kernel for {q.scheme.name} on {device.type}"
    return IntLinear, ""


def deployed_form(q: QuantLinear) -> nn.Module:
    """``q``'s integer form, or ``q`` itself where it has none here."""
    cls, _ = _deployed_class(q)
    return q if cls is None else cls(q)


def deploy(model: nn.Module, runtime: str = "int", *, quiet: bool = False) -> nn.Module:
    """Swap packed quantized linears for their integer form (``runtime="int"``), in place."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if runtime == "reference":
        return model
    kept: dict[str, int] = {}
    if any(isinstance(m, QuantLinear) and m.input_sparsifier is not None for m in model.modules()):
        deploy_sparse(model)  # what it leaves (no kernel here) goes on below
    swaps = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            cls, why = _deployed_class(mod)
            if cls is None:
                kept[f"{mod.scheme.name}: {why}"] = kept.get(f"{mod.scheme.name}: {why}", 0) + 1
            else:
                swaps.append((name, cls(mod)))
    for name, new in swaps:
        model.set_submodule(name, new)
    if kept and not quiet:
        print("mmcompress: reference (fake-quant) forward for "
              + "; ".join(f"{n} layer(s) ({why})" for why, n in kept.items()), file=sys.stderr)
    model._mmcompress_runtime = runtime
    return model


def deployed_scheme_counts(model: nn.Module) -> dict[str, int]:
    """``{scheme name: number of integer-path layers}`` (for reports)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, IntLinear):
            out[m.scheme.name] = out.get(m.scheme.name, 0) + 1
    return out


__all__ = ["IntLinear", "IntMASLinear", "QuantScheme", "RUNTIMES", "deploy", "deployed_form", "deployed_scheme_counts"]
