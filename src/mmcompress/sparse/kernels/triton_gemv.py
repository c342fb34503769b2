"""GPU backend: a split-K sparse GEMV in Triton over the column-major weight (TEAL-style).

``y[b, :] = sum_i xs[b, i] · WT[i, :]`` for ``xs [B, in]`` (already sparsified: zeros are skipped),
``WT [in, out]`` contiguous (= W stored column-major), fp16 or bf16, ``B = 1..8``.

Grid ``(cdiv(out, BLOCK_N), cdiv(in, BLOCK_K))``: each program owns a ``BLOCK_K × BLOCK_N`` weight
tile.  It loads the ``B × BLOCK_K`` activations, builds the row mask "some token is non-zero on this
input channel", and loads the weight tile **with that row mask**, so skipped rows cause no memory
traffic (masked lanes issue no loads).  Products are accumulated in fp32 per token and added with fp32
atomics into a zero-filled fp32 buffer ``[B, out]`` (supports bf16, unlike TEAL's fp16 atomics), which
is then cast to the activation dtype.  Summation order across K-splits is not deterministic (fp32,
so the spread is ~1e-6 relative).

Selection (Top-K / threshold) happens before the call in PyTorch (``kernels.sparse_linear``).  Prefill
(more than 8 tokens) never reaches this kernel.

Triton is imported lazily; without it (or without CUDA) :func:`available` is ``False`` and callers
use the PyTorch path.
"""

from __future__ import annotations

import warnings

import torch


try:  # guarded: Triton is optional (CPU-only installs have none)
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as _e:  # ImportError, or a broken install
    triton = tl = None
    _IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

_splitk_sparse_gemv = None
if triton is not None:

    @triton.jit
    def _splitk_sparse_gemv(X, WT, Y, N, K, stride_xb, stride_wk, stride_yb,
                            B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        mask_k = offs_k < K
        # row mask: an input channel is read if any token keeps it
        keep = tl.zeros([BLOCK_K], dtype=tl.int32)
        for b in tl.static_range(B):
            xb = tl.load(X + b * stride_xb + offs_k, mask=mask_k, other=0.0)
            keep = keep | (xb != 0).to(tl.int32)
        row_mask = (keep != 0) & mask_k
        w = tl.load(WT + offs_k[:, None] * stride_wk + offs_n[None, :],
                    mask=row_mask[:, None] & mask_n[None, :], other=0.0, eviction_policy="evict_first")
        w = w.to(tl.float32)
        for b in tl.static_range(B):
            xb = tl.load(X + b * stride_xb + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            part = tl.sum(xb[:, None] * w, axis=0)
            tl.atomic_add(Y + b * stride_yb + offs_n, part, mask=mask_n, sem="relaxed")


_STATE: dict = {"checked": False, "ok": False, "error": None, "warned": False}


def available() -> bool:
    if not _STATE["checked"]:
        _STATE["checked"] = True
        try:
            if triton is None:
                raise ImportError(_IMPORT_ERROR)
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            _STATE["ok"] = True
        except Exception as e:  # ImportError, no CUDA, broken install
            _STATE["error"] = f"{type(e).__name__}: {e}"
    return _STATE["ok"]


def error() -> str | None:
    return _STATE["error"]


def warn_fallback() -> None:
    if not _STATE["warned"]:
        _STATE["warned"] = True
        warnings.warn(f"mmcompress: the Triton sparse kernel is unavailable ({_STATE['error']}); using the PyTorch "
                      "sparse path.", RuntimeWarning, stacklevel=3)


_CONFIGS = ((16, 256, 4), (32, 256, 4), (64, 256, 4), (32, 128, 4), (64, 128, 4), (128, 128, 4),
            (16, 512, 4), (32, 512, 4), (64, 512, 8), (128, 64, 4), (8, 1024, 4), (16, 1024, 8))
_BEST: dict = {}  # (N, K, B, dtype) -> (BLOCK_K, BLOCK_N, num_warps)


def _build():
    if _splitk_sparse_gemv is None:
        raise RuntimeError(f"Triton is not available ({_IMPORT_ERROR})")
    return _splitk_sparse_gemv


def _launch(x, wt, y, cfg):
    bk, bn, warps = cfg
    B, K = x.shape
    N = wt.shape[1]
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    _build()[grid](x, wt, y, N, K, x.stride(0), wt.stride(0), y.stride(0), B=B, BLOCK_K=bk, BLOCK_N=bn,
                   num_warps=warps)


def _tune(x, wt, key):
    """Pick the fastest tile config for this shape (once per (N, K, B, dtype)); the output buffer is
    re-zeroed for every trial, so tuning never leaks into results."""
    from triton.testing import do_bench

    best, best_t = None, float("inf")
    y = torch.zeros(x.shape[0], wt.shape[1], device=x.device, dtype=torch.float32)
    for cfg in _CONFIGS:
        try:
            t = do_bench(lambda: (y.zero_(), _launch(x, wt, y, cfg)), warmup=5, rep=20)
        except Exception:  # a config that does not compile / fit on this GPU
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("no Triton sparse GEMV configuration compiled on this device")
    _BEST[key] = best
    return best


def sparse_gemv(xs: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``xs [B, in] @ weight_t [in, out] (+ bias)`` skipping the rows where every token is zero.

    ``config`` = ``(BLOCK_K, BLOCK_N, num_warps)`` skips the per-shape tuning (tests use it)."""
    if xs.dim() != 2 or weight_t.dim() != 2 or xs.shape[1] != weight_t.shape[0]:
        raise ValueError(f"shapes do not match: xs {tuple(xs.shape)}, weight_t {tuple(weight_t.shape)}")
    B, K = xs.shape
    N = weight_t.shape[1]
    if not 1 <= B <= 8:
        raise ValueError(f"the Triton sparse GEMV takes 1..8 tokens, got {B}")
    if weight_t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported weight dtype {weight_t.dtype}")
    wt = weight_t if weight_t.stride(1) == 1 else weight_t.contiguous()
    x = xs.to(wt.dtype).contiguous()
    key = (N, K, B, wt.dtype)
    cfg = config or _BEST.get(key) or _tune(x, wt, key)
    y = torch.zeros(B, N, device=xs.device, dtype=torch.float32)
    _launch(x, wt, y, cfg)
    if bias is not None:
        y += bias.float()
    return y.to(xs.dtype)
