"""Sparse decode kernels: ``y = S(x) · W`` with the weight stored input-channel-major (``WT = Wᵀ``).

One interface, three backends:

* ``"torch"``: the PyTorch reference (the oracle in tests); any device, any number of tokens;
* ``"cpu"``: a C++/OpenMP kernel (``sparse_gemv.cpp``) compiled on first use; 1..8 tokens per call,
  fp32 or bf16 weights, fp32 accumulation, Top-K selection in C++ (radix pre-pass + nth_element);
* ``"triton"``: Triton kernels on CUDA (fp16/bf16/fp32, 1..8 tokens): a per-token Top-K threshold
  kernel (exact K-th largest ``|x|``) and a masked GEMV over the column-major weight that reads the
  dense ``x`` and keeps ``|x| >= threshold`` (see ``triton_gemv``; ties at the K-th magnitude are all
  kept, so a token may keep slightly more than ``k`` channels when magnitudes tie);
* ``"auto"``: ``"triton"`` on CUDA when Triton imports, ``"cpu"`` on CPU when the extension builds,
  else ``"torch"``.

The selection ``S`` is one of: Top-K (``k``: exactly ``k`` channels of largest ``|x|`` per token),
a magnitude threshold (``threshold``: keep ``|x| >= t``), or given ``indices``/``values`` ([tokens, k]).
Calls with more tokens than a kernel takes (prefill) use the PyTorch path, which is a dense GEMM on the
sparsified input.  ``k >= in_features`` means dense: the kernels then skip selection entirely.
"""

from __future__ import annotations

import torch

from ..topk import topk_sparsify
from . import cpu as _cpu

BACKENDS = ("torch", "cpu", "triton", "auto")
MAX_KERNEL_TOKENS = 8


def triton_available() -> bool:
    from . import triton_gemv

    return triton_gemv.available()


def resolve_backend(backend: str, device) -> str:
    """The concrete backend (``torch`` | ``cpu`` | ``triton``) that ``backend`` means on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    dev = torch.device(device)
    if backend == "auto":
        if dev.type == "cuda":
            return "triton" if triton_available() else "torch"
        if dev.type == "cpu":
            return "cpu" if _cpu.available() else "torch"
        return "torch"
    if backend == "cpu" and dev.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got device {dev}")
    if backend == "triton" and dev.type != "cuda":
        raise ValueError(f"backend 'triton' needs CUDA tensors, got device {dev}")
    if backend == "cpu" and not _cpu.available():
        _cpu.warn_fallback()
        return "torch"
    if backend == "triton" and not triton_available():
        from . import triton_gemv

        triton_gemv.warn_fallback()
        return "torch"
    return backend


def available_backends() -> list[str]:
    out = ["torch"]
    if _cpu.available():
        out.append("cpu")
    if torch.cuda.is_available() and triton_available():
        out.append("triton")
    return out


def sparsify_reference(x: torch.Tensor, k: int | None = None, threshold: float | None = None,
                       indices: torch.Tensor | None = None, values: torch.Tensor | None = None) -> torch.Tensor:
    """The dense sparsified input ``S(x)`` (zeros outside the kept set), in ``x``'s dtype."""
    if indices is not None:
        return torch.zeros_like(x).scatter_add(-1, indices.long(), values.to(x.dtype))
    if threshold is not None:
        return x * (x.abs() >= threshold)
    if k is None:
        raise ValueError("give k, threshold, or indices and values")
    return topk_sparsify(x, int(k))


def _check(x: torch.Tensor, weight_t: torch.Tensor):
    if weight_t.dim() != 2:
        raise ValueError(f"weight_t must be [in, out], got shape {tuple(weight_t.shape)}")
    if x.shape[-1] != weight_t.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} channels but weight_t has {weight_t.shape[0]} input rows")


def sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, k: int | None = None, bias: torch.Tensor | None = None, *,
                  backend: str = "auto", threshold: float | None = None, indices: torch.Tensor | None = None,
                  values: torch.Tensor | None = None) -> torch.Tensor:
    """``S(x) · weight_t + bias`` for ``x [..., in]`` and ``weight_t [in, out]``; returns ``[..., out]``.

    ``indices``/``values`` (``[..., k]``) give the kept channels directly (e.g. one selection shared by
    q, k and v); otherwise ``k`` (Top-K) or ``threshold``.  Output dtype = ``x.dtype``.
    """
    _check(x, weight_t)
    be = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    tokens = 1
    for s in lead:
        tokens *= s
    din, dout = weight_t.shape
    if be == "cpu" and (tokens > MAX_KERNEL_TOKENS or tokens == 0 or x.dtype not in (torch.float32, torch.bfloat16)
                        or weight_t.dtype not in (torch.float32, torch.bfloat16)):
        be = "torch"
    if be == "triton" and (tokens > MAX_KERNEL_TOKENS or tokens == 0):
        be = "torch"
    if be == "torch":
        xs = sparsify_reference(x, k, threshold, indices, values) if (indices is not None or threshold is not None
                                                                      or (k is not None and k < din)) else x
        y = xs.to(weight_t.dtype) @ weight_t
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype)
    x2 = x.reshape(tokens, din)
    if be == "cpu":
        ops = _cpu.ops()
        wt = weight_t if weight_t.is_contiguous() else weight_t.contiguous()
        b = None if bias is None else bias.contiguous()
        if indices is not None:
            y = ops.indexed_gemv(indices.reshape(tokens, -1), values.reshape(tokens, -1), wt, b, x.dtype)
        elif threshold is not None:
            y = ops.threshold_gemv(x2.contiguous(), wt, float(threshold), b)
        else:
            if k is None:
                raise ValueError("give k, threshold, or indices and values")
            y = ops.topk_gemv(x2.contiguous(), wt, int(k), b)
        return y.reshape(*lead, dout)
    y = _triton_linear(x2, weight_t, k, bias, threshold, indices, values)
    return y.reshape(*lead, dout).to(x.dtype)


def _triton_linear(x2: torch.Tensor, weight_t: torch.Tensor, k: int | None, bias: torch.Tensor | None,
                   threshold: float | None, indices: torch.Tensor | None, values: torch.Tensor | None) -> torch.Tensor:
    """The Triton path of :func:`sparse_linear` for ``x2 [tokens <= 8, in]``.

    Top-K: the fused threshold kernel + masked GEMV (``triton_gemv.topk_sparse_gemv``; magnitudes tied
    with the K-th largest are all kept).  Threshold (TEAL): the same masked GEMV with a constant threshold.
    Given indices/values: scattered in PyTorch, then the GEMV skips the zero rows.  ``k`` None or
    ``>= in``: dense."""
    from . import triton_gemv

    tokens = x2.shape[0]
    if indices is not None:
        xs = sparsify_reference(x2, indices=indices.reshape(tokens, -1), values=values.reshape(tokens, -1))
        return triton_gemv.sparse_gemv(xs, weight_t, bias)
    if threshold is not None:
        return triton_gemv.sparse_gemv(x2, weight_t, bias, thr=float(threshold))
    din = x2.shape[1]
    return triton_gemv.topk_sparse_gemv(x2, weight_t, din if k is None else int(k), bias)


def topk_select(x: torch.Tensor, k: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Kept channels of every token: ``(indices [..., k] int64 ascending, values [..., k] fp32)``."""
    be = resolve_backend(backend, x.device)
    d = x.shape[-1]
    k = max(0, min(int(k), d))
    if be == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        x2 = x.reshape(-1, d).contiguous()
        idx, vals = _cpu.ops().topk_select(x2, k)
        return idx.reshape(*x.shape[:-1], k), vals.reshape(*x.shape[:-1], k)
    idx = x.abs().topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    return idx, x.gather(-1, idx).float()
