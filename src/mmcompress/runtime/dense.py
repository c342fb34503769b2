"""Dense decoder layers on our GEMV kernel (the fastest dense decode path measured on AVX-512 CPUs, the
baseline every decode speed-up is quoted against), and the process's peak memory."""

from __future__ import annotations

import resource

import torch
from torch import nn

from ..sparse.linear import SparseLinear
from ..sparse.topk import keep_count

# the seven projections of a LLaMA-style decoder layer
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


@torch.no_grad()
def dense_kernel_layer(layer: nn.Module, sparsity: float, backend: str, paths=PROJECTIONS) -> nn.Module:
    """Replace the projections at ``paths`` by ``SparseLinear`` in the kernel's layout keeping
    ``1 - sparsity`` of the input channels (0.0: our dense GEMV), in place, one weight copy each."""
    for path in paths:
        lin = layer.get_submodule(path)
        sl = SparseLinear(lin.in_features, lin.out_features, lin.bias is not None,
                          keep_count(lin.in_features, sparsity), dtype=lin.weight.dtype, device="meta")
        sl.weight = nn.Parameter(lin.weight.data.t().contiguous().t(), requires_grad=False)  # WT layout
        if lin.bias is not None:
            sl.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        sl.set_backend(backend)
        sl.sparse_prefill = False
        layer.set_submodule(path, sl)
    return layer


def peak_rss_bytes() -> int:
    """The process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
