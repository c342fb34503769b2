"""A linear layer whose input is Top-K sparsified per token: ``y = S_k(x) Wᵀ + b``.

This is the PyTorch reference path (the oracle in tests).  Kernel backends (CPU C++, GPU Triton)
plug in behind the same module through ``backend``; see :mod:`mmcompress.sparse.kernels`.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_sparse_module
from .topk import topk_sparsify


@register_sparse_module
class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, keep: int, dtype=torch.float32, device=None,
                 mode: str = "topk", threshold: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.keep = int(keep)  # K: channels kept per token (mode "topk")
        self.mode = mode  # "topk" | "threshold" (TEAL) | "dense"
        self.threshold = float(threshold)
        self.backend = "torch"
        self.sparse_prefill = True  # False: tokens of a multi-token call run dense

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep: int, **kw) -> "SparseLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, keep,
                dtype=linear.weight.dtype, device=linear.weight.device, **kw)
        m.weight.data.copy_(linear.weight.data)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.data)
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "keep": self.keep, "mode": self.mode, "threshold": self.threshold,
                "sparse_prefill": self.sparse_prefill, "dtype": str(self.weight.dtype).replace("torch.", "")}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "SparseLinear":
        m = cls(spec["in_features"], spec["out_features"], spec["bias"], spec["keep"],
                dtype=getattr(torch, spec.get("dtype", "float32")), device=device, mode=spec.get("mode", "topk"),
                threshold=spec.get("threshold", 0.0))
        m.sparse_prefill = spec.get("sparse_prefill", True)
        return m

    @property
    def sparsity(self) -> float:
        return 1.0 - self.keep / self.in_features

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense" or (not self.sparse_prefill and x.dim() >= 2 and x.shape[-2] > 1):
            return x
        if self.mode == "threshold":
            return x * (x.abs() >= self.threshold)
        return topk_sparsify(x, self.keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.sparsify(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, keep={self.keep}, mode={self.mode}, backend={self.backend}"
