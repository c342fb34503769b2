"""RTN: round-to-nearest min–max quantization, ``Ŵ = Q_w(W)``, ``ŷ = Q_a(x) Ŵᵀ + b``; no calibration."""

from __future__ import annotations

from ...engine import LayerContext
from .base import QuantMethod, quantize_layer_linears


class RTN(QuantMethod):
    name = "rtn"
    distributed = True  # no statistics: every rank quantizes the same weights
    data_free = True  # the walk runs no calibration chain for it (only the diagnostics' held-out one, if any)

    def step(self, ctx: LayerContext) -> None:
        quantize_layer_linears(ctx.layer, ctx.adapter, self.scheme)
