"""CPU integer kernels (``int_gemm.cpp``, AVX-512 VNNI), compiled on first use like the sparse kernel.

Built with ``torch.utils.cpp_extension.load`` into the same cache as ``sparse/kernels/cpu.py`` (the
name hashes the source, flags, torch, Python and the CPU), registered as ``torch.ops.mmcompress_int``.
:func:`available` is ``False`` (and the deployed linears use their torch path) when the CPU lacks
AVX-512 VNNI or the build fails.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import torch

from ...sparse.kernels.cpu import _FLAGS, _cpu_signature
from ...sparse.kernels.cpu import build_dir as _sparse_build_dir

_SRC = Path(__file__).with_name("int_gemm.cpp")
_NEEDED = ("avx512f", "avx512bw", "avx512_vnni")
_LOCK = threading.Lock()
_STATE: dict = {"loaded": False, "error": None}


def build_name() -> str:
    h = hashlib.sha256()
    for part in (_SRC.read_bytes(), " ".join(_FLAGS).encode(), torch.__version__.encode(), sys.version.encode(),
                 _cpu_signature().encode()):
        h.update(part)
    return f"mmcompress_int_gemm_{h.hexdigest()[:12]}"


def _cpu_has_vnni() -> bool:
    sig = _cpu_signature()
    flags = next((line.split(":", 1)[1].split() for line in sig.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in _NEEDED)


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the extension; ``True`` if ``torch.ops.mmcompress_int`` is usable."""
    if _STATE["loaded"] or _STATE["error"] is not None:
        return _STATE["loaded"]
    with _LOCK:
        if _STATE["loaded"] or _STATE["error"] is not None:
            return _STATE["loaded"]
        if os.environ.get("MMCOMPRESS_NO_CPU_KERNEL"):
            _STATE["error"] = "disabled by MMCOMPRESS_NO_CPU_KERNEL"
        elif not _cpu_has_vnni():
            _STATE["error"] = "this CPU lacks AVX-512 VNNI"
        else:
            try:
                from torch.utils import cpp_extension

                d = _sparse_build_dir().parent / build_name()
                d.mkdir(parents=True, exist_ok=True)
                cpp_extension.load(name=build_name(), sources=[str(_SRC)], extra_cflags=_FLAGS,
                                   extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=verbose,
                                   is_python_module=False)
                torch.ops.mmcompress_int.int8_act_gemm  # noqa: B018  (raises if the library did not register)
                _STATE["loaded"] = True
            except Exception as e:  # no compiler, headers, ...: the torch path is used instead
                msg = str(e).strip()
                _STATE["error"] = f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"
    return _STATE["loaded"]


def available() -> bool:
    return load()


def error() -> str | None:
    return _STATE["error"]
