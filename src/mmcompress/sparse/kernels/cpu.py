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

from ...fileio import cache_dir

_SRC = Path(__file__).with_name("sparse_gemv.cpp")
HEADERS = Path(__file__).parent  # the headers every extension may include (share_work.h): on the include path
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


def extension_name(prefix: str, src: Path) -> str:
    """``prefix_<hash>``: the hash covers the source, the shared headers (:data:`HEADERS`), the flags,
    torch, Python and the CPU, so a build made for another CPU or toolchain, or before a header changed,
    is never reused; and the source's path: torch's ``build.ninja`` records the path it compiled, so two
    installs (or checkouts) of the same source sharing one directory rebuilt it in turn, ≈ 20 s per
    extension inside whatever the process was doing."""
    h = hashlib.sha256()
    headers = [p.read_bytes() for p in sorted(HEADERS.glob("*.h"))]
    for part in (src.read_bytes(), *headers, " ".join(_FLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode(), _cpu_signature().encode(), str(src.resolve()).encode()):
        h.update(part)
    return f"{prefix}_{h.hexdigest()[:12]}"


def build_name() -> str:
    return extension_name("mmcompress_sparse_gemv", _SRC)


def build_dir(name: str | None = None) -> Path:
    return cache_dir("torch_extensions", name or build_name())


def compile_and_load(name: str, src: Path, probe, verbose: bool = False) -> str | None:
    """Build ``src`` (first time) into the cache under ``name``, load it and call ``probe()`` (which raises
    if the library did not register its ops).  Returns ``None``, or the one-line reason it failed.

    Builds are serialised by an advisory lock (``flock``) on ``<dir>/build.flock``, which the kernel
    releases when its holder dies.  torch's own ``lock`` file is not: a process killed mid-build
    (Ctrl-C, OOM) leaves it behind and every later process would wait on it forever.  Holding the
    ``flock`` proves no other mmcompress process is building, so a ``lock`` file found then is stale and
    is removed."""
    try:
        import fcntl

        from torch.utils import cpp_extension

        d = build_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "build.flock", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                (d / "lock").unlink(missing_ok=True)  # torch's FileBaton of a build that died
                cpp_extension.load(name=name, sources=[str(src)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                                   extra_include_paths=[str(HEADERS)], build_directory=str(d), verbose=verbose,
                                   is_python_module=False)
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
        probe()
        return None
    except Exception as e:  # no compiler, headers, ...: the caller falls back to torch
        msg = str(e).strip()
        return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"


def load_extension(state: dict, name, src: Path, probe, verbose: bool = False, why_not=None) -> bool:
    """Build and load an extension once per process (thread-safe); ``state["loaded"]``, or the one-line
    reason it is not in ``state["error"]``.  ``name()`` is its build name (:func:`extension_name`);
    ``why_not()`` a reason not to try (``None``: try), checked after ``MMCOMPRESS_NO_CPU_KERNEL``."""
    if state["loaded"] or state["error"] is not None:
        return state["loaded"]
    with _LOCK:
        if state["loaded"] or state["error"] is not None:
            return state["loaded"]
        reason = "disabled by MMCOMPRESS_NO_CPU_KERNEL" if os.environ.get("MMCOMPRESS_NO_CPU_KERNEL") else \
            why_not() if why_not is not None else None
        state["error"] = reason or compile_and_load(name(), src, probe, verbose)
        state["loaded"] = state["error"] is None
    return state["loaded"]


def warn_once(state: dict, message: str) -> None:
    """``message`` as a :class:`RuntimeWarning`, the first time only (``state["warned"]``)."""
    if not state["warned"]:
        state["warned"] = True
        warnings.warn(message, RuntimeWarning, stacklevel=4)


PREFETCH_SETTINGS = ("rows", "ahead", "none")  # MMCOMPRESS_KERNEL_PREFETCH: sparse_gemv.cpp's default_prefetch


def prefetch_setting_notice() -> str | None:
    """One line when ``MMCOMPRESS_KERNEL_PREFETCH`` is set to something the kernel ignores, else ``None``."""
    v = os.environ.get("MMCOMPRESS_KERNEL_PREFETCH")
    if v is None or v in PREFETCH_SETTINGS:
        return None
    return (f"mmcompress: MMCOMPRESS_KERNEL_PREFETCH={v!r} ignored (expected 'rows', 'ahead' or 'none'); "
            "the sparse kernels use this CPU's default")


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the extension; ``True`` if ``torch.ops.mmcompress_sparse`` is usable."""
    first = not (_STATE["loaded"] or _STATE["error"] is not None)
    ok = load_extension(_STATE, build_name, _SRC, lambda: torch.ops.mmcompress_sparse.topk_gemv, verbose)
    if first and ok and (notice := prefetch_setting_notice()):
        print(notice, file=sys.stderr)
    return ok


def available() -> bool:
    return load()


def error() -> str | None:
    return _STATE["error"]


def warn_fallback() -> None:
    warn_once(_STATE, f"mmcompress: the C++ sparse kernel is unavailable ({_STATE['error']}); using the PyTorch "
                      "sparse path (correct, but slower than dense). Install a C++ compiler (g++) and the Python "
                      "headers to enable it.")


def ops():
    return torch.ops.mmcompress_sparse
