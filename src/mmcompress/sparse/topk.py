"""Per-token Top-K activation sparsification (a pure function).

``S_k(x)_i = x_i`` if ``|x_i|`` is among the ``k`` largest magnitudes of the token vector, else 0.

**Tie policy** (one rule for the PyTorch reference and the C++ CPU kernel, ``sparse_gemv.cpp``
``topk_row``): exactly ``k`` entries are kept per token.  Magnitudes are ranked by the IEEE bits of
``|x|`` in float32 (so ``+0 == −0``, and NaN ranks above ``+inf``); entries tied with the ``k``-th
largest magnitude are kept in increasing index order until ``k`` are kept.  The zero fraction is then
``1 − k/D`` exactly, whatever the data (bf16 activations tie often), and that is the sparsity reported.
``keep_count(D, s)`` is ``round((1 − s)·D)``, clamped to [1, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import real

LEVEL = real(0, 1, hi_open=True)  # validator of a sparsity level (the fraction of zeros): a number in [0, 1)


def check_level(sparsity, what: str = "sparsity") -> float:
    """The one range check of a sparsity level: ``sparsity`` as a float, or ``ValueError``."""
    try:
        return float(LEVEL(sparsity))
    except ValueError as e:
        raise ValueError(f"{what} {e}") from None


def keep_count(dim: int, sparsity: float) -> int:
    """The one place a level becomes a Top-K ``K``: ``round((1 − s)·D)`` clamped to [1, D]."""
    return max(1, min(dim, int(round((1.0 - check_level(sparsity)) * dim))))


@dataclass(frozen=True)
class TopK:
    """Selector: keep the ``k`` largest-magnitude entries of every token (the tie policy above)."""

    k: int


@dataclass(frozen=True)
class Threshold:
    """Selector (TEAL): keep the entries with ``|x_i| >= t`` (:func:`threshold_keep`)."""

    t: float


@dataclass(frozen=True)
class Dense:
    """Selector: keep everything."""


Selector = TopK | Threshold | Dense


def threshold_keep(x: torch.Tensor, t: float) -> torch.Tensor:
    """Boolean mask of the entries a magnitude threshold ``t`` keeps: ``not |x_i| < t``, compared in float32
    with ``t`` rounded to float32, the CPU kernels' rule (``sparse_gemv.cpp``'s ``threshold_row``, the fused
    step's ``threshold_select``).  So a bf16 or fp16 ``x`` is compared exactly (its values are float32
    values), not against ``t`` rounded to its own dtype, and NaN is kept (it propagates, as in a dense
    model): prefill and the decode kernels keep the same channels of the same vector."""
    t32 = torch.tensor(t, dtype=torch.float32).item()  # float32(t), exactly, as a Python float
    return ~(x.abs().float() < t32)


def select(x: torch.Tensor, selector: Selector) -> torch.Tensor:
    """``x`` with the entries the selector drops set to zero."""
    if isinstance(selector, Threshold):
        return x * threshold_keep(x, selector.t)
    if isinstance(selector, TopK):
        return topk_sparsify(x, selector.k)
    return x


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys whose order is the order of ``|x|`` in float32 (NaN above +inf), as the CPU kernel."""
    return x.float().view(torch.int32) & 0x7FFFFFFF


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the kept entries along the last dimension: exactly ``min(k, D)`` per vector,
    ties at the ``k``-th magnitude broken towards the lowest index (the tie policy above)."""
    d = x.shape[-1]
    if k >= d:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    keys = magnitude_keys(x)
    tau = keys.kthvalue(d - k + 1, dim=-1, keepdim=True).values  # the k-th largest key (a selection: no sort)
    above = keys > tau
    tied = keys == tau
    need = k - above.sum(-1, keepdim=True)  # >= 1 tied entries to keep, lowest index first
    return above | (tied & (tied.cumsum(-1) <= need))


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """The kept indices ``[..., min(k, D)]`` (int64, ascending) under the tie policy."""
    k = max(0, min(int(k), x.shape[-1]))
    mask = topk_mask(x, k)
    idx = torch.arange(x.shape[-1], device=x.device).expand(x.shape)
    # kept positions sort first (key 0) in index order, dropped ones after (key D + index)
    return torch.where(mask, idx, idx + x.shape[-1]).sort(dim=-1).values[..., :k]


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest-magnitude entries of every vector along the last dimension (tie policy above)."""
    if k >= x.shape[-1]:
        return x
    return torch.where(topk_mask(x, k), x, torch.zeros_like(x))
