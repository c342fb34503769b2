"""Non-finite values (NaN, ±inf): refused in weights, calibration activations and method results,
and never printed as bare ``NaN`` in JSON output (strict parsers reject it)."""

from __future__ import annotations

import math

import torch
from torch import nn


class NonFiniteError(ValueError):
    """A tensor holds NaN or ±inf; the message names the first one."""


_CHUNK = 1 << 20  # elements per isfinite() call: its temporaries (abs, masks) stay a few MB, not 2.5x the tensor


def _bad(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()) or t.is_meta:
        return False
    flat = t.reshape(-1) if t.is_contiguous() else t
    if flat.dim() != 1:
        return not bool(torch.isfinite(t).all())
    if t.is_floating_point() and flat.numel():
        # min and max, no temporaries: NaN propagates into both, ±inf is one of them (whole-model checks
        # run per quantize).  amin and amax apart, not aminmax: on torch 2.13's CPU build the fused
        # aminmax is 5-10x slower than the two reductions together (docs/runtime.md, "aminmax")
        for s in range(0, flat.numel(), 4 * _CHUNK):
            chunk = flat[s:s + 4 * _CHUNK]
            lo, hi = chunk.amin(), chunk.amax()
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                return True
        return False
    return any(not bool(torch.isfinite(flat[s:s + _CHUNK]).all()) for s in range(0, flat.numel(), _CHUNK))


def first_non_finite(named_tensors) -> str | None:
    """The name of the first tensor with a NaN or ±inf in ``(name, tensor)`` pairs, else ``None``."""
    for name, t in named_tensors:
        if isinstance(t, torch.Tensor) and _bad(t.detach()):
            return name
    return None


def check_module(module: nn.Module, what: str, prefix: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the first parameter or buffer of ``module`` that is not finite."""
    tensors = list(module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=True))
    tensors += list(module.named_buffers(prefix=prefix.rstrip("."), remove_duplicate=True))
    name = first_non_finite(tensors)
    if name is not None:
        raise NonFiniteError(f"non-finite values (NaN/inf) in {what} {name}; nothing was written")


def check_activations(tensors, what: str) -> None:
    """Raise naming the first calibration sample whose activation at ``what`` is not finite."""
    j = first_non_finite(enumerate(tensors))
    if j is not None:
        raise NonFiniteError(f"non-finite calibration activations (NaN/inf) {what}, calibration sample {j}; "
                             "check the weights and the calibration data (nothing was written)")


def module_path(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    return type(module).__name__


def json_safe(obj, path: str = "", replaced: list | None = None):
    """A copy of ``obj`` with every non-finite float replaced by ``None``; the JSON paths of the
    replaced values are appended to ``replaced``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if replaced is not None:
            replaced.append(path or "(top level)")
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v, f"{path}.{k}" if path else str(k), replaced) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{path}[{i}]", replaced) for i, v in enumerate(obj)]
    return obj
