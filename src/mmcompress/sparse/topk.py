"""Per-token Top-K activation sparsification (a pure function).

``S_k(x)_i = x_i`` if ``|x_i|`` is among the ``k`` largest magnitudes of the token vector, else 0.
Exactly ``k`` entries are kept per token (ties broken by ``torch.topk``), so the zero fraction is
``1 − k/D`` exactly.  ``keep_count(D, s)`` is ``round((1 − s)·D)``, clamped to [1, D].
"""

from __future__ import annotations

import torch


def keep_count(dim: int, sparsity: float) -> int:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return max(1, min(dim, int(round((1.0 - sparsity) * dim))))


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest-magnitude entries of every vector along the last dimension."""
    d = x.shape[-1]
    if k >= d:
        return x
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
