"""Build a renamed copy of one of our C++ kernel sources as its own torch extension (for A/B benchmarks).

Shared by ``gemv_prefetch.py`` and ``int4_variants.py``: the source text (already renamed to the op
namespace ``ns``) is written under the kernels' build directory and compiled once (cached by content).
"""

import torch

from mmcompress.sparse.kernels import cpu


def build_variant(ns: str, text: str, probe: str):
    """``torch.ops.<ns>`` after compiling ``text``; ``probe`` is an op name that must exist once loaded."""
    d = cpu.build_dir(ns)
    d.mkdir(parents=True, exist_ok=True)
    src = d / f"{ns}.cpp"
    if not src.exists() or src.read_text() != text:
        src.write_text(text)
    err = cpu.compile_and_load(cpu.extension_name(ns, src), src, lambda: getattr(getattr(torch.ops, ns), probe))
    if err:
        raise SystemExit(f"build of {ns} failed: {err}")
    return getattr(torch.ops, ns)
