"""Sparse decode kernels: ``y = S(x) · W`` with the weight stored input-channel-major (``WT = Wᵀ``).

One interface, three backends:

* ``"torch"``: the PyTorch reference (the oracle in tests); any device, any number of tokens;
* ``"cpu"``: a C++/OpenMP kernel (``sparse_gemv.cpp``) compiled on first use; 1..8 tokens per call,
  fp32 or bf16 weights, fp32 accumulation, Top-K selection in C++ (radix pre-pass + nth_element);
* ``"triton"``: Triton kernels on CUDA (fp16/bf16/fp32, 1..8 tokens): a per-token Top-K kernel (the
  exact K-th largest ``|x|`` and the last tied index kept) and a masked GEMV over the column-major
  weight that reads the dense ``x`` and keeps exactly those ``k`` channels (see ``triton_gemv``);
* ``"auto"``: ``"triton"`` on CUDA when Triton imports, ``"cpu"`` on CPU when the extension builds,
  else ``"torch"``.

Sparse int8 (LaRoSA + W8A8, :func:`sparse_int8_linear`): the same Top-K, then per-token int8 codes of
the kept values and int8 weight codes (``[in, out]`` uint8 = code + 128), int32 accumulation with
AVX-512 VNNI on the CPU kernel; :func:`sparse_int8_reference` is its PyTorch oracle.

The selection ``S`` is one of: Top-K (``k``: exactly ``k`` channels of largest ``|x|`` per token; the
PyTorch path, the CPU kernel and the Triton kernels share one tie policy, ties at the K-th magnitude keep
the lowest indices, see :mod:`..topk`),
a magnitude threshold (``threshold``: keep ``|x| >= t``), or given ``indices``/``values`` ([tokens, k]).
Calls with more tokens than a kernel takes (prefill) use the PyTorch path, which is a dense GEMM on the
sparsified input.  ``k >= in_features`` means dense: the kernels then skip selection entirely.
"""

from __future__ import annotations

import torch

from ..topk import topk_indices, topk_sparsify
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

    Top-K: the fused threshold kernel + masked GEMV (``triton_gemv.topk_sparse_gemv``; exactly ``k``
    channels, ties as the other backends).  Threshold (TEAL): the same masked GEMV with a constant threshold.
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
    idx = topk_indices(x, k)  # the CPU kernel's tie policy (sparse/topk.py)
    return idx, x.gather(-1, idx).float()


# -- sparse int8 GEMV (Top-K, then W8A8) ----------------------------------------------------------


def pack_int8_weight(codes: torch.Tensor, zero: torch.Tensor | None = None, bits: int = 8,
                     sym: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel layout of int8 weight codes ``[out, in]`` (as ``QuantLinear`` stores them).

    Returns ``(wq [in, out] uint8 = codes + 128, zc [out] int32 = 128 + z)`` where ``z`` is the zero
    point in stored-code units (``ŵ = (codes − z)·Δ``; 0 for symmetric weights, ``zero − 2^(bits−1)``
    for asymmetric ones, whose codes are stored shifted by ``2^(bits−1)``)."""
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise ValueError(f"codes must be int8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
    wq = (codes.t().to(torch.int16) + 128).to(torch.uint8).contiguous()
    zc = torch.full((codes.shape[0],), 128, dtype=torch.int32, device=codes.device)
    if not sym:
        if zero is None or zero.numel() != codes.shape[0]:
            raise ValueError("asymmetric weights need one zero point per output channel")
        zc = zc + (zero.reshape(-1).round().to(torch.int32) - 2 ** (bits - 1))
    return wq, zc


def unpack_int8_weight(wq: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int8_weight`'s code layout: int8 codes ``[out, in]``."""
    return (wq.t().to(torch.int16) - 128).to(torch.int8).contiguous()


def _stable_topk(x2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU kernel's selection: the ``k`` largest ``|x|``, ties at the K-th magnitude keep the lowest
    indices; returned ascending."""
    idx = topk_indices(x2, k)
    return idx, x2.float().gather(-1, idx)


def sparse_int8_reference(x: torch.Tensor, wq: torch.Tensor, wscale: torch.Tensor, zc: torch.Tensor,
                          k: int | None = None, bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                          abits: int = 8, indices: torch.Tensor | None = None, values: torch.Tensor | None = None,
                          return_acc: bool = False):
    """The PyTorch oracle of :func:`sparse_int8_linear` (exact int64 accumulation, fp32 epilogue)."""
    din, dout = wq.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, din)
    if indices is None:
        indices, values = _stable_topk(x2, din if k is None else min(int(k), din))
    idx = indices.reshape(x2.shape[0], -1).long()
    v = values.reshape(x2.shape[0], -1).float()
    if smooth is not None:
        v = v / smooth.float()[idx]
    qmax = 2 ** (abits - 1) - 1
    sa = (v.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-10) if v.shape[-1] else \
        torch.full((v.shape[0], 1), 1e-10)
    q = torch.clamp(torch.round(v / sa), -qmax, qmax)
    qd = torch.zeros(x2.shape[0], din, dtype=torch.float64, device=x.device).scatter(-1, idx, q.double())
    acc = (qd @ (wq.double() - zc.double())).round().long()  # integer partial sums < 2^53: exact in float64
    y = acc.float() * (sa * wscale.float())
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype).reshape(*lead, dout)
    return (y, acc) if return_acc else y


def sparse_int8_linear(x: torch.Tensor, wq: torch.Tensor, wscale: torch.Tensor, zc: torch.Tensor,
                       k: int | None = None, bias: torch.Tensor | None = None, *, smooth: torch.Tensor | None = None,
                       abits: int = 8, indices: torch.Tensor | None = None, values: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """``y = sa·Δ ⊙ (Q_a(S_k(x)/s) · (C − z)) + b`` for ``x [..., in]``, codes ``wq [in, out]`` (see
    :func:`pack_int8_weight`), per-output-channel steps ``wscale [out]``; returns ``[..., out]`` in
    ``x.dtype``.  ``Q_a``: per-token symmetric ``abits`` codes over the kept values; ``S_k``: Top-K by
    magnitude (or the given ``indices`` / ``values``).  CPU kernel for 1..8 tokens, else the
    PyTorch reference (same numbers)."""
    if wq.dim() != 2 or x.shape[-1] != wq.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} channels but wq is {tuple(wq.shape)} ([in, out])")
    be = resolve_backend(backend, x.device)
    din, dout = wq.shape
    tokens = x.numel() // din if din else 0
    if be != "cpu" or not 1 <= tokens <= MAX_KERNEL_TOKENS or x.dtype not in (torch.float32, torch.bfloat16):
        return sparse_int8_reference(x, wq, wscale, zc, k, bias, smooth, abits, indices, values)
    ops = _cpu.ops()
    sm = None if smooth is None else smooth.float().contiguous()
    b = None if bias is None else bias.contiguous()
    if indices is not None:
        y = ops.indexed_int8_gemv(indices.reshape(tokens, -1), values.reshape(tokens, -1), wq, wscale, zc, sm, b,
                                  int(abits), x.dtype)
    else:
        y = ops.topk_int8_gemv(x.reshape(tokens, din).contiguous(), wq, wscale, zc, din if k is None else int(k),
                               sm, b, int(abits))
    return y.reshape(*x.shape[:-1], dout)
