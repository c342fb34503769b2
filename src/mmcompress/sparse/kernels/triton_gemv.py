"""GPU backend: Triton kernels for sparse decode GEMVs over the column-major weight (TEAL-style).

Notation: ``x [B, K]`` activations (``B = 1..8`` tokens), ``WT [K, N]`` contiguous (= ``W`` stored
column-major), fp16 / bf16 / fp32; ``thr [B]`` fp32 per-token magnitude thresholds.

**Masked GEMV.**  ``y[b, :] = bias + sum_{i: keep(b, i)} x[b, i] · WT[i, :]`` with
``keep(b, i) = (x[b, i] != 0) and |x[b, i]| >= thr[b]`` (no ``thr``: every non-zero is kept; a scalar
threshold: the same ``thr`` for every token).  The kernel reads the *dense* ``x`` and masks it itself
(no scatter, no compacted copy).  Weight row ``i`` is loaded only where some token keeps channel ``i``
(the row mask is the OR over tokens), so dropped rows cause no memory traffic (masked lanes issue no
loads).  Products are accumulated in fp32.  Two variants, picked per shape by :func:`_tune`:

* ``"rows"``: grid ``cdiv(N, BLOCK_N)``; each program owns a ``BLOCK_N`` output slice and loops over
  all of ``K`` in ``BLOCK_K`` chunks (the next chunk of ``x`` is prefetched while the weight tile
  loads), accumulating ``[B, BLOCK_K, BLOCK_N]`` fp32 partial products that are reduced once at the
  end; bias is added and ``y`` is written directly in the activation dtype: **one launch**, no zero
  fill, no cast, deterministic.
* ``"splitk"``: grid ``(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))``; each program owns one
  ``BLOCK_K × BLOCK_N`` tile and adds its per-token partial sums with fp32 atomics (bf16-safe, unlike
  TEAL's fp16 atomics) into a zero-filled fp32 buffer (bias added by the ``pid_k == 0`` programs),
  which is then cast to the activation dtype: three launches (zeros, GEMV, cast), but far more
  programs, which wins when ``N / BLOCK_N`` is small relative to the SM count.  Summation order
  across K-splits is not deterministic (fp32, so the spread is ~1e-6 relative).

**Per-token Top-K threshold** (:func:`topk_threshold`).  One program per token computes the exact
K-th largest ``|x[b, :]|``: the magnitudes are viewed as int32 (``bits = float32(x) & 0x7fffffff``,
which is monotone in ``|x|``), and the largest ``T`` with ``#{i: bits_i >= T} >= K`` is found bit by
bit from bit 30 down (``T | 2^j`` is kept when the count still reaches ``K``), one block-wide count
per bit; the row of ``x`` stays in registers when it fits one block (``D <= 32768``), else every pass
re-reads it in chunks.  fp16 / bf16 values upcast to fp32 have their low 13 / 16 mantissa bits zero,
so only bits 30..13 / 30..16 are searched (18 / 15 passes; fp32: 31).  The result ``thr[b]`` is that
K-th largest magnitude (equal to ``torch.topk(|x|, K).values[-1]``).

**Top-K semantics / ties.**  Exactly ``K`` channels per token, the tie policy of the PyTorch path and
the CPU kernel (``sparse/topk.py``): every magnitude above the K-th largest, then the entries tied with
it in index order until ``K`` are kept.  The threshold kernel also returns ``cut[b]``, the index of the
last tied entry kept (the ``need``-th entry with ``|x| = thr``, ``need = K − #{|x| > thr}``, found with
a prefix count over the row), and the GEMV keeps ``|x| > thr  or  (|x| = thr and i <= cut)``.  With a
per-token ``thr`` and no ``cut`` (or a scalar TEAL threshold) it keeps ``|x| >= thr``.  Zeros are never
read (they contribute nothing), so if the K-th largest magnitude is 0 fewer than ``K`` rows are read —
the product is still exactly the Top-K one.  :func:`topk_sparse_gemv` = threshold kernel + masked GEMV:
2 launches with the ``rows`` variant.

Selection by given indices (``kernels.sparse_linear(indices=...)``) still scatters in PyTorch first.
Prefill (more than 8 tokens) never reaches these kernels.

Triton is optional (guarded import; this module itself is imported lazily); without it (or without
CUDA) :func:`available` is ``False`` and callers use the PyTorch path.  The kernels also run on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported, see
``tests/test_triton_interpret.py``); per-shape tuning then is skipped (:data:`DEFAULT_CONFIG`).
"""

from __future__ import annotations

import torch

from .cpu import warn_once

try:  # guarded: Triton is optional (CPU-only installs have none)
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as _e:  # ImportError, or a broken install
    triton = tl = None
    _IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

_topk_threshold_kernel = _rows_gemv = _splitk_gemv = None
if triton is not None:

    @triton.jit
    def _magnitude_bits(xrow, o, D):
        """int32 keys of |x[o]| (``float32(x) & 0x7fffffff``, monotone in |x|); -1 past ``D`` (never counted)."""
        m = o < D
        v = tl.load(xrow + o, mask=m, other=0.0).to(tl.float32)
        return tl.where(m, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)

    @triton.jit
    def _topk_threshold_kernel(X, THR, CUT, D, K, stride_xb, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
                               LOW_BIT: tl.constexpr):
        """thr[b] = the K-th largest |x[b, :D]| (exact; 1 <= K <= D), by a bitwise search on its int32 bits;
        cut[b] = the index of the last entry with |x| = thr that the Top-K keeps (lowest indices first)."""
        b = tl.program_id(0)
        xrow = X + b.to(tl.int64) * stride_xb
        offs = tl.arange(0, BLOCK_D)
        if ONE_CHUNK:
            bits = _magnitude_bits(xrow, offs, D)  # padding never counts
        t = b * 0  # int32 scalar: the answer so far (bits above the current one)
        for i in tl.static_range(31 - LOW_BIT):
            cand = t | (1 << (30 - i))
            if ONE_CHUNK:
                cnt = tl.sum((bits >= cand).to(tl.int32), axis=0)
            else:
                cnt = b * 0
                for start in range(0, D, BLOCK_D):
                    bc = _magnitude_bits(xrow, start + offs, D)
                    cnt += tl.sum((bc >= cand).to(tl.int32), axis=0)
            t = tl.where(cnt >= K, cand, t)
        # ties: keep the first `need` entries equal to t (need >= 1, since #{bits > t} < K <= #{bits >= t})
        if ONE_CHUNK:
            need = K - tl.sum((bits > t).to(tl.int32), axis=0)
            tied = bits == t
            rank = tl.cumsum(tied.to(tl.int32), axis=0)
            cut = tl.min(tl.where(tied & (rank == need), offs, D), axis=0)
        else:
            above = b * 0
            for start in range(0, D, BLOCK_D):
                above += tl.sum((_magnitude_bits(xrow, start + offs, D) > t).to(tl.int32), axis=0)
            need = K - above
            seen = b * 0
            cut = b * 0 + D
            for start in range(0, D, BLOCK_D):
                o = start + offs
                tied = _magnitude_bits(xrow, o, D) == t
                rank = tl.cumsum(tied.to(tl.int32), axis=0) + seen
                cut = tl.minimum(cut, tl.min(tl.where(tied & (rank == need), o, D), axis=0))
                seen += tl.sum(tied.to(tl.int32), axis=0)
        tl.store(THR + b, t.to(tl.float32, bitcast=True))
        tl.store(CUT + b, cut)

    @triton.jit
    def _token_bounds(THR, CUT, thr_val, B, B_PAD: tl.constexpr, THR_MODE: tl.constexpr):
        """``offs_b``, ``mask_b`` and the [B_PAD] fp32 thresholds and int32 tie cuts: mode 0 none, 1 the
        scalar ``thr_val``, 2 per token from ``THR`` and ``CUT``."""
        offs_b = tl.arange(0, B_PAD)
        mask_b = offs_b < B
        if THR_MODE == 2:
            thr = tl.load(THR + offs_b, mask=mask_b, other=0.0)
            cut = tl.load(CUT + offs_b, mask=mask_b, other=0)
        else:
            thr = offs_b.to(tl.float32) * 0.0 + thr_val
            cut = offs_b * 0
        return offs_b, mask_b, thr, cut

    @triton.jit
    def _kept(x, offs_k, thr, cut, THR_MODE: tl.constexpr):
        """x [B_PAD, BLOCK_K] (fp32) with the dropped entries zeroed: mode 1 ``|x| >= thr``; mode 2 (per-token
        thr and cut) ``|x| > thr or (|x| = thr and k <= cut)``."""
        a = tl.abs(x)
        if THR_MODE == 1:
            x = tl.where(a >= thr[:, None], x, 0.0)
        if THR_MODE == 2:
            keep = (a > thr[:, None]) | ((a == thr[:, None]) & (offs_k[None, :] <= cut[:, None]))
            x = tl.where(keep, x, 0.0)
        return x

    @triton.jit
    def _load_kept(X, offs_b, mask_b, offs_k, K, stride_xb, thr, cut, THR_MODE: tl.constexpr):
        """x[:, offs_k] in fp32 with the dropped entries zeroed ([B_PAD, BLOCK_K])."""
        x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :],
                    mask=mask_b[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        return _kept(x, offs_k, thr, cut, THR_MODE)

    @triton.jit
    def _rows_gemv(X, THR, CUT, WT, BIAS, Y, N, K, stride_xb, stride_wk, stride_yb, thr_val,
                   B: tl.constexpr, B_PAD: tl.constexpr, THR_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_b, mask_b, thr, cut = _token_bounds(THR, CUT, thr_val, B, B_PAD, THR_MODE)
        acc = tl.zeros([B_PAD, BLOCK_K, BLOCK_N], dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        x = _load_kept(X, offs_b, mask_b, offs_k, K, stride_xb, thr, cut, THR_MODE)
        for k0 in range(0, K, BLOCK_K):
            # prefetch the next activation chunk while this weight tile loads
            x_next = _load_kept(X, offs_b, mask_b, offs_k + (k0 + BLOCK_K), K, stride_xb, thr, cut, THR_MODE)
            row = tl.max((x != 0).to(tl.int32), axis=0) != 0  # [BLOCK_K]: some token keeps the channel
            w = tl.load(WT + (offs_k + k0)[:, None].to(tl.int64) * stride_wk + offs_n[None, :],
                        mask=row[:, None] & mask_n[None, :], other=0.0, eviction_policy="evict_first")
            acc += x[:, :, None] * w.to(tl.float32)[None, :, :]
            x = x_next
        y = tl.sum(acc, axis=1)  # [B_PAD, BLOCK_N]
        if HAS_BIAS:
            y += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_b[:, None] * stride_yb + offs_n[None, :], y.to(Y.dtype.element_ty),
                 mask=mask_b[:, None] & mask_n[None, :])

    @triton.jit
    def _splitk_gemv(X, THR, CUT, WT, BIAS, Y, N, K, stride_xb, stride_wk, stride_yb, thr_val,
                     B: tl.constexpr, B_PAD: tl.constexpr, THR_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        # row mask: an input channel is read if any token keeps it
        offs_b, mask_b, thr, cut = _token_bounds(THR, CUT, thr_val, B, B_PAD, THR_MODE)
        x = _load_kept(X, offs_b, mask_b, offs_k, K, stride_xb, thr, cut, THR_MODE)  # [B_PAD, BLOCK_K]
        row_mask = tl.max((x != 0).to(tl.int32), axis=0) != 0
        w = tl.load(WT + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :],
                    mask=row_mask[:, None] & mask_n[None, :], other=0.0, eviction_policy="evict_first")
        w = w.to(tl.float32)
        if HAS_BIAS:
            first = (offs_n * 0 + pid_k) == 0  # only the first K-split adds the bias
            bias = tl.load(BIAS + offs_n, mask=mask_n & first, other=0.0).to(tl.float32)
        for b in tl.static_range(B):
            xb = tl.sum(tl.where((offs_b == b)[:, None], x, 0.0), axis=0)  # row b of the kept activations
            part = tl.sum(xb[:, None] * w, axis=0)
            if HAS_BIAS:
                part += bias
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
    warn_once(_STATE, f"mmcompress: the Triton sparse kernel is unavailable ({_STATE['error']}); using the PyTorch "
                      "sparse path.")


def interpreted() -> bool:
    """True when the kernels were defined under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _rows_gemv is not None and type(_rows_gemv).__name__ == "InterpretedFunction"


def _need_triton():
    if triton is None:
        raise RuntimeError(f"Triton is not available ({_IMPORT_ERROR})")


# -- Top-K threshold -----------------------------------------------------------------------------------

MAX_ONE_CHUNK = 32768  # rows up to this length stay in registers for the whole search
_LOW_BIT = {torch.float16: 13, torch.bfloat16: 16, torch.float32: 0}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def topk_bounds(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token Top-K selection ``(thr [B] fp32, cut [B] int32)``: ``thr[b] = sort(|x[b]|, desc)[k - 1]``
    and ``cut[b]`` the index of the last entry with ``|x[b]| = thr[b]`` that the Top-K keeps, so that
    ``|x| > thr or (|x| = thr and i <= cut)`` keeps exactly ``k`` channels (ties: lowest indices first).

    ``x [B, D]`` fp16 / bf16 / fp32 (any B; one program per token), ``1 <= k <= D``."""
    _need_triton()
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, D], got shape {tuple(x.shape)}")
    if x.dtype not in _LOW_BIT:
        raise ValueError(f"unsupported dtype {x.dtype}")
    B, D = x.shape
    k = int(k)
    if not 1 <= k <= D:
        raise ValueError(f"k must be in [1, {D}], got {k}")
    x = x if x.stride(1) == 1 else x.contiguous()
    thr = torch.empty(B, device=x.device, dtype=torch.float32)
    cut = torch.empty(B, device=x.device, dtype=torch.int32)
    if B == 0:
        return thr, cut
    one = D <= MAX_ONE_CHUNK
    block = max(16, _next_pow2(D)) if one else 8192
    warps = max(4, min(16, block // 256))
    _topk_threshold_kernel[(B,)](x, thr, cut, D, k, x.stride(0), BLOCK_D=block, ONE_CHUNK=one,
                                 LOW_BIT=_LOW_BIT[x.dtype], num_warps=warps)
    return thr, cut


def topk_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token K-th largest magnitude ``thr [B]`` (fp32), the first half of :func:`topk_bounds`."""
    return topk_bounds(x, k)[0]


# -- masked GEMV -------------------------------------------------------------------------------------

# (BLOCK_K, BLOCK_N, num_warps) candidates per variant; "rows" keeps a [B_PAD, BLOCK_K, BLOCK_N] fp32
# accumulator, so its configs are filtered to <= 64 accumulator registers per thread.
_CONFIGS = {
    "rows": ((32, 32, 4), (64, 32, 4), (128, 32, 8), (32, 64, 4), (64, 64, 8), (16, 128, 4), (8, 64, 4)),
    "splitk": ((16, 256, 4), (64, 128, 4), (128, 64, 4), (128, 128, 4), (32, 512, 4), (8, 1024, 4)),
}
_BEST: dict = {}  # (N, K, B, dtype) -> (variant, BLOCK_K, BLOCK_N, num_warps)
TUNE_LOG: list = []  # (key, chosen config, {config: ms}, rejected configs) per tuned shape
DEFAULT_CONFIG = ("rows", 32, 32, 4)  # used without CUDA (interpreter) when no config is given


def _b_pad(B: int) -> int:
    return _next_pow2(B)


def candidate_configs(B: int) -> list[tuple]:
    out = []
    for variant, cfgs in _CONFIGS.items():
        for bk, bn, warps in cfgs:
            if variant == "rows" and _b_pad(B) * bk * bn > 64 * 32 * warps:
                continue
            out.append((variant, bk, bn, warps))
    return out


def _norm_config(config) -> tuple:
    if len(config) == 3:  # legacy (BLOCK_K, BLOCK_N, num_warps): the split-K kernel
        return ("splitk", *config)
    if len(config) != 4 or config[0] not in _CONFIGS:
        raise ValueError(f"config must be (variant, BLOCK_K, BLOCK_N, num_warps) with variant in {list(_CONFIGS)}, "
                         f"got {config!r}")
    return tuple(config)


def _launch(x, wt, bias, thr, cfg) -> torch.Tensor:
    """One masked GEMV with ``cfg``; returns ``y [B, N]`` in ``x.dtype``.  ``thr``: None, a float (keep
    ``|x| >= thr``) or a ``(thr [B] fp32, cut [B] int32)`` pair from :func:`topk_bounds`."""
    variant, bk, bn, warps = cfg
    B, K = x.shape
    N = wt.shape[1]
    if thr is None:
        mode, thr_t, cut_t, thr_val = 0, x, x, 0.0
    elif isinstance(thr, tuple):
        mode, (thr_t, cut_t), thr_val = 2, thr, 0.0
    else:
        mode, thr_t, cut_t, thr_val = 1, x, x, float(thr)
    has_bias = bias is not None
    bias_t = bias if has_bias else x
    meta = dict(B=B, B_PAD=_b_pad(B), THR_MODE=mode, HAS_BIAS=has_bias, BLOCK_K=bk, BLOCK_N=bn, num_warps=warps)
    if variant == "rows":
        y = torch.empty(B, N, device=x.device, dtype=x.dtype)
        _rows_gemv[(triton.cdiv(N, bn),)](x, thr_t, cut_t, wt, bias_t, y, N, K, x.stride(0), wt.stride(0),
                                          y.stride(0), thr_val, **meta)
        return y
    y = torch.zeros(B, N, device=x.device, dtype=torch.float32)
    _splitk_gemv[(triton.cdiv(N, bn), triton.cdiv(K, bk))](x, thr_t, cut_t, wt, bias_t, y, N, K, x.stride(0),
                                                           wt.stride(0), y.stride(0), thr_val, **meta)
    return y.to(x.dtype)


def _kept_reference(x: torch.Tensor, thr) -> torch.Tensor:
    """``x`` (fp32) with what the GEMV drops zeroed, for ``thr`` as in :func:`_launch`."""
    xf = x.float()
    if thr is None:
        return xf
    if isinstance(thr, tuple):
        t, cut = thr[0].view(-1, 1), thr[1].view(-1, 1).long()
        idx = torch.arange(xf.shape[1], device=xf.device)
        keep = (xf.abs() > t) | ((xf.abs() == t) & (idx <= cut))
    else:
        keep = xf.abs() >= thr
    return torch.where(keep, xf, torch.zeros_like(xf))


def _reference(x, wt, bias, thr) -> torch.Tensor:
    y = _kept_reference(x, thr) @ wt.float()
    return y if bias is None else y + bias.float()


def _tune(x, wt, bias, thr, key):
    """Pick the fastest config for this shape (once per (N, K, B, dtype)), timing the whole call (zero fill and
    cast included for split-K).  A config that does not compile, or whose output on this input differs from
    the PyTorch fp32 product (rel. > 1e-2), is rejected and logged in ``TUNE_LOG``."""
    from triton.testing import do_bench

    ref = _reference(x, wt, bias, thr)
    scale = ref.abs().max().clamp_min(1e-12)
    best, best_t, times, rejected = None, float("inf"), {}, {}
    for cfg in candidate_configs(x.shape[0]):
        try:
            y = _launch(x, wt, bias, thr, cfg)
            err = ((y.float() - ref).abs().max() / scale).item()
            if not err < 1e-2:
                rejected[cfg] = f"rel err {err:.2e}"
                continue
            t = do_bench(lambda: _launch(x, wt, bias, thr, cfg), warmup=5, rep=20)
        except Exception as e:  # a config that does not compile / fit on this GPU
            rejected[cfg] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        t = float(t[0] if isinstance(t, (list, tuple)) else t)
        times[cfg] = t
        if t < best_t:
            best, best_t = cfg, t
    TUNE_LOG.append({"key": key, "best": best, "ms": times, "rejected": rejected})
    if best is None:
        raise RuntimeError(f"no Triton sparse GEMV configuration works on this device: {rejected}")
    _BEST[key] = best
    return best


def _prepare(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None):
    if x.dim() != 2 or weight_t.dim() != 2 or x.shape[1] != weight_t.shape[0]:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight_t {tuple(weight_t.shape)}")
    B = x.shape[0]
    if not 1 <= B <= 8:
        raise ValueError(f"the Triton sparse GEMV takes 1..8 tokens, got {B}")
    if weight_t.dtype not in _LOW_BIT:
        raise ValueError(f"unsupported weight dtype {weight_t.dtype}")
    wt = weight_t if weight_t.stride(1) == 1 else weight_t.contiguous()
    x2 = x.to(wt.dtype)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return x2, wt, bias


def _gemv(x, wt, bias, thr, config):
    _need_triton()
    key = (wt.shape[1], wt.shape[0], x.shape[0], wt.dtype)
    if config is not None:
        cfg = _norm_config(config)
    elif key in _BEST:
        cfg = _BEST[key]
    elif x.device.type != "cuda":  # interpreter: no timing
        cfg = DEFAULT_CONFIG
    else:
        cfg = _tune(x, wt, bias, thr, key)
    return _launch(x, wt, bias, thr, cfg)


def sparse_gemv(xs: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple | None = None, thr=None) -> torch.Tensor:
    """``S(xs) [B, in] @ weight_t [in, out] (+ bias)`` reading only the weight rows some token keeps.

    ``thr``: ``None`` keeps every non-zero of ``xs`` (pre-sparsified input), a float keeps ``|xs| >= thr``
    (TEAL threshold), a ``[B]`` fp32 tensor a per-token threshold (``|xs| >= thr[b]``), and a
    ``(thr, cut)`` pair from :func:`topk_bounds` exactly the Top-K.
    ``config`` = ``(variant, BLOCK_K, BLOCK_N, num_warps)`` (``variant`` ``"rows"`` or ``"splitk"``; a
    3-tuple means ``"splitk"``) skips the per-shape tuning (tests use it).  Output dtype = ``xs.dtype``."""
    out_dtype = xs.dtype
    x, wt, bias = _prepare(xs, weight_t, bias)
    if isinstance(thr, torch.Tensor):  # per-token threshold, every tie kept
        thr = (thr, torch.full((x.shape[0],), torch.iinfo(torch.int32).max, dtype=torch.int32, device=x.device))
    if isinstance(thr, tuple):
        t, cut = (v.to(device=x.device).reshape(-1).contiguous() for v in thr)
        if t.numel() != x.shape[0] or cut.numel() != x.shape[0]:
            raise ValueError(f"thr must have one value per token ({x.shape[0]}), got {t.numel()}")
        thr = (t.to(torch.float32), cut.to(torch.int32))
    return _gemv(x, wt, bias, thr, config).to(out_dtype)


def topk_sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                     config: tuple | None = None) -> torch.Tensor:
    """Fused per-token Top-K sparse linear: ``topk_bounds(x, k)`` then the masked GEMV keeping
    exactly ``k`` channels per token (2 launches with the ``rows`` variant; ties at the K-th magnitude keep
    the lowest indices, as the PyTorch path and the CPU kernel).  ``k >= in`` is dense (no threshold);
    ``k <= 0`` gives ``bias`` (or zeros)."""
    out_dtype = x.dtype
    xc, wt, bias = _prepare(x, weight_t, bias)
    din = xc.shape[1]
    k = int(k)
    if k <= 0:
        y = torch.zeros(xc.shape[0], wt.shape[1], device=xc.device, dtype=torch.float32)
        return (y if bias is None else y + bias.float()).to(out_dtype)
    thr = topk_bounds(xc, k) if k < din else None
    return _gemv(xc, wt, bias, thr, config).to(out_dtype)
