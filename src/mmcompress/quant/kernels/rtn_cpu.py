"""Round-to-nearest weight quantization in one pass per row (``rtn_pack.cpp``), for data-free RTN.

:func:`quantize_weight_into` gives the stored form of a weight (``QuantLinear.packed_weight``: int8 codes, or
two int4 codes per byte at <= 4 bits, float32 step sizes and zero points), bit for bit, in one pass over
each row (read, statistics, divide, round, clamp, pack) into buffers the caller reuses, instead of the
reference's chain of whole-tensor torch ops (widen to float32, min/max, divide, round, clamp, narrow,
pack: each a pass over memory, with temporaries).  Portable C++ (``-O3 -march=native``, no intrinsics),
built on first use with the kernels' machinery (:func:`~mmcompress.sparse.kernels.cpu.compile_and_load`)
and registered as ``torch.ops.mmcompress_rtn``.  Where it cannot be built (or ``MMCOMPRESS_NO_CPU_KERNEL``
is set) :func:`available` is ``False`` and callers use the reference.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ...sparse.kernels.cpu import compile_and_load, extension_name
from ..quantizer import QuantScheme

_SRC = Path(__file__).with_name("rtn_pack.cpp")
_LOCK = threading.Lock()
_STATE: dict = {"loaded": False, "error": None}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the extension; ``True`` if ``torch.ops.mmcompress_rtn`` is usable."""
    if _STATE["loaded"] or _STATE["error"] is not None:
        return _STATE["loaded"]
    with _LOCK:
        if _STATE["loaded"] or _STATE["error"] is not None:
            return _STATE["loaded"]
        if os.environ.get("MMCOMPRESS_NO_CPU_KERNEL"):
            _STATE["error"] = "disabled by MMCOMPRESS_NO_CPU_KERNEL"
        else:
            _STATE["error"] = compile_and_load(extension_name("mmcompress_rtn_pack", _SRC), _SRC,
                                               lambda: torch.ops.mmcompress_rtn.quantize_weight_, verbose)
            _STATE["loaded"] = _STATE["error"] is None
    return _STATE["loaded"]


def available() -> bool:
    return load()


def error() -> str | None:
    return _STATE["error"]


def packed_shapes(out_features: int, in_features: int, scheme: QuantScheme) -> dict[str, tuple[torch.dtype, tuple]]:
    """dtype and shape of ``weight_codes``, ``weight_scale`` and ``weight_zero`` (``QuantLinear``'s buffers)."""
    gs = scheme.group_size if 0 < scheme.group_size < in_features else in_features
    groups = -(-in_features // gs)
    codes = ((torch.uint8, (out_features, (in_features + 1) // 2)) if scheme.wbits <= 4
             else (torch.int8, (out_features, in_features)))
    return {"weight_codes": codes, "weight_scale": (torch.float32, (out_features, groups)),
            "weight_zero": (torch.float32, (out_features, groups))}


def quantize_weight_into(weight: torch.Tensor, scheme: QuantScheme, out: dict[str, torch.Tensor]) -> bool:
    """Write ``QuantLinear.packed_weight(weight, scheme)`` into ``out`` (tensors of :func:`packed_shapes`).

    ``False`` (``out`` then holds nothing of use) when the kernel does not take this input: no kernel here,
    a dtype other than float32/bfloat16/float16, more than 8 bits, or values the kernel leaves to the
    reference (NaN, inf, or -0.0 as the minimum of an asymmetric group)."""
    if not (scheme.wbits <= 8 and weight.dim() == 2 and weight.dtype in DTYPES and weight.device.type == "cpu"
            and available()):
        return False
    return bool(torch.ops.mmcompress_rtn.quantize_weight_(weight.contiguous(), out["weight_codes"],
                                                          out["weight_scale"], out["weight_zero"], scheme.wbits,
                                                          scheme.group_size, scheme.sym))
