"""CPU backend: the C++/OpenMP sparse GEMV in ``sparse_gemv.cpp``, compiled on first use.

The extension is built with ``torch.utils.cpp_extension.load`` (``-O3 -march=native -fopenmp``) into
``$MMCOMPRESS_CACHE`` (default ``~/.cache/mmcompress``)``/torch_extensions/<name>``, where ``<name>``
hashes the source, the flags, the torch version and the CPU model/flags, so a copy built for another
CPU is never reused.  The first build takes roughly 10–30 s; later processes load the cached ``.so``.

If the build fails (no compiler, no Python headers) a one-time warning is printed and
:func:`available` returns ``False``; callers then fall back to the PyTorch path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("sparse_gemv.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++20", "-Wno-unused-function"]
_LOCK = threading.Lock()
_STATE: dict = {"loaded": False, "error": None, "warned": False}


def _cpu_signature() -> str:
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    sig += line
                if line.startswith("flags"):
                    break
    except OSError:
        sig += platform.processor()
    return sig


def build_name() -> str:
    h = hashlib.sha256()
    h.update(_SRC.read_bytes())
    h.update(" ".join(_FLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_cpu_signature().encode())
    return f"mmcompress_sparse_gemv_{h.hexdigest()[:12]}"


def build_dir() -> Path:
    root = Path(os.environ.get("MMCOMPRESS_CACHE", Path.home() / ".cache" / "mmcompress"))
    return root / "torch_extensions" / build_name()


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the extension; ``True`` if ``torch.ops.mmcompress_sparse`` is usable."""
    if _STATE["loaded"]:
        return True
    if _STATE["error"] is not None:
        return False
    with _LOCK:
        if _STATE["loaded"] or _STATE["error"] is not None:
            return _STATE["loaded"]
        if os.environ.get("MMCOMPRESS_NO_CPU_KERNEL"):
            _STATE["error"] = "disabled by MMCOMPRESS_NO_CPU_KERNEL"
            return False
        try:
            from torch.utils import cpp_extension

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=build_name(), sources=[str(_SRC)], extra_cflags=_FLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=verbose,
                               is_python_module=False)
            torch.ops.mmcompress_sparse.topk_gemv  # noqa: B018  (raises if the library did not register)
            _STATE["loaded"] = True
        except Exception as e:  # no compiler, headers, ...: fall back to torch, once, loudly
            _STATE["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return _STATE["loaded"]


def available() -> bool:
    return load()


def error() -> str | None:
    return _STATE["error"]


def warn_fallback() -> None:
    if not _STATE["warned"]:
        _STATE["warned"] = True
        warnings.warn(f"mmcompress: the C++ sparse kernel is unavailable ({_STATE['error']}); using the PyTorch "
                      "sparse path (correct, but slower than dense). Install a C++ compiler (g++) and the Python "
                      "headers to enable it.", RuntimeWarning, stacklevel=3)


def ops():
    return torch.ops.mmcompress_sparse
