"""CPU integer kernels (``int_gemm.cpp``, AVX-512 VNNI), compiled on first use like the sparse kernel.

Built with ``torch.utils.cpp_extension.load`` into the same cache as ``sparse/kernels/cpu.py`` (the
name hashes the source, flags, torch, Python and the CPU), registered as ``torch.ops.mmcompress_int``.
:func:`available` is ``False`` (and the deployed linears use their torch path) when the CPU lacks
AVX-512 VNNI or the build fails.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...sparse.kernels.cpu import _cpu_signature, extension_name, load_extension

_SRC = Path(__file__).with_name("int_gemm.cpp")
_NEEDED = ("avx512f", "avx512bw", "avx512_vnni")
_STATE: dict = {"loaded": False, "error": None}


def build_name() -> str:
    return extension_name("mmcompress_int_gemm", _SRC)


def _cpu_has_vnni() -> bool:
    sig = _cpu_signature()
    flags = next((line.split(":", 1)[1].split() for line in sig.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in _NEEDED)


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the extension; ``True`` if ``torch.ops.mmcompress_int`` is usable."""
    return load_extension(_STATE, build_name, _SRC, lambda: torch.ops.mmcompress_int.int8_act_gemm, verbose,
                          why_not=lambda: None if _cpu_has_vnni() else "this CPU lacks AVX-512 VNNI")


def available() -> bool:
    return load()


def bf16_available() -> bool:
    """Whether the build has the bf16-activation kernel (``-march=native`` on a CPU with AVX512_BF16)."""
    if "bf16" not in _STATE:
        _STATE["bf16"] = load() and bool(torch.ops.mmcompress_int.bf16_act_available())
    return _STATE["bf16"]


def error() -> str | None:
    return _STATE["error"]
