"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then quantize.

For each group of linears that read the same input X (q/k/v; o; gate/up; optionally down):

    s_j = max_t |X_tj|^α / max_i |W_ij|^(1−α)                           (E2)
    X Wᵀ = (X / s)(W ⊙ s)ᵀ,   quantized: Q_a(X / s) · Q_w(W ⊙ s)ᵀ       (E1, E3)

The activation statistic ``max_t |X_tj|`` is taken over **all** calibration tokens (every modality),
which is exactly what MASQuant's modality-aware smoothing replaces.  It is measured on the
full-precision model (the engine's uncompressed chain), as the reference computes its activation
scales in one pass over the unquantized model, and as every method here takes its statistics.  ``max_i |W_ij|`` is taken over
the rows of every reader in the group.  ``1/s`` is folded into the preceding RMSNorm (q/k/v,
gate/up) or into the producing linear's output rows (v → o without GQA, up → down).  A group whose
division cannot be folded (o_proj under grouped-query attention) is not smoothed by default, so
the result exports to a stock checkpoint; ``runtime_smoothing=True`` smooths it with a run-time
division inside :class:`~mmcompress.quant.linear.QuantLinear`, as MASQuant's SmoothQuant baseline
does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import options as opt
from ...engine import LayerContext
from .base import QuantMethod, apply_smoothing, quantize_layer_linears, smoothing_foldable, weight_column_absmax
from .stats import InputCollector

ALL_ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
DEFAULT_GROUPS = ("attn_in", "attn_out", "mlp_in")


@dataclass(frozen=True)
class SmoothQuantOptions(opt.Options):
    alpha: float = opt.option(0.5, opt.real(0, 1), "smoothing migration strength α of E2")
    groups: tuple = opt.option(DEFAULT_GROUPS, opt.subset(*ALL_ROLES),
                               "the linear groups to smooth (comma-separated)", parse=str)
    runtime_smoothing: bool = opt.option(False, opt.boolean, "also smooth groups that cannot be folded (o_proj under "
                                                             "GQA) with a run-time division (not exportable)")


class SmoothQuant(QuantMethod):
    name = "smoothquant"
    distributed = True
    needs_fp_chain = True  # statistics of the full-precision model, as the reference and every method here
    Options = SmoothQuantOptions

    def _groups(self, ctx: LayerContext) -> list:
        return [g for g in ctx.adapter.groups if g.role in self.groups
                and (self.runtime_smoothing or smoothing_foldable(ctx.layer, g, None))]

    def fp_observers(self, ctx: LayerContext):
        """The activation maxima, gathered on the engine's pass of the uncompressed chain."""
        return self.watch_fp_pass(ctx, AbsmaxCollector(self._groups(ctx)))

    def step(self, ctx: LayerContext) -> None:
        layer, adapter = ctx.layer, ctx.adapter
        groups = self._groups(ctx)
        seen = self.fp_collected(ctx)
        act_absmax = seen.result(ctx) if seen is not None else collect_absmax(ctx, groups)
        unseen = [g.name for g in groups if not bool(act_absmax[g.name].gt(0).any())]  # an expert no token reached
        groups = [g for g in groups if g.name not in unseen]
        quantize_layer_linears(layer, adapter, self.scheme, pack=False)
        placement = {}
        for g in groups:
            s = smoothing_factors(act_absmax[g.name], weight_column_absmax(g.modules(layer)), self.alpha)
            placement[g.name] = apply_smoothing(layer, adapter, g, s)
        placement.update({name: "no tokens" for name in unseen})
        for path in adapter.linear_names():
            layer.get_submodule(path).pack()
        ctx.info["smoothing"] = placement


def smoothing_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """E2 with the clamps of the reference: ``s = clamp(a^α / w^(1−α), ≥ 1e-5)``."""
    a = act_absmax.detach().double().cpu().clamp(min=1e-5)  # statistics live on the CPU, weights anywhere
    w = w_absmax.detach().double().cpu().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


class AbsmaxCollector(InputCollector):
    """Per-input-channel ``max |x|`` of each group's input over every token it is given (:meth:`record`)."""

    def record(self, name: str, x: torch.Tensor, ids: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).double().cpu()
        self.stats[name] = m if name not in self.stats else torch.maximum(self.stats[name], m)

    def result(self, ctx: LayerContext) -> dict[str, torch.Tensor]:
        """Every rank's maxima; zeros for a group no token reached (an MoE expert the router never chose)."""
        zeros = {g.name: torch.zeros(g.modules(ctx.layer)[0].in_features, dtype=torch.float64) for g in self.groups}
        return {g.name: ctx.world.max(self.stats.get(g.name, zeros[g.name])) for g in self.groups}


def collect_absmax(ctx: LayerContext, groups) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` of each group's input over all tokens of all samples (of every rank),
    on the full-precision chain; zeros for a group no token reached (an MoE expert the router never chose)."""
    collector = AbsmaxCollector(groups)
    ctx.collect(collector.modules(ctx.layer), collector.record, inputs=ctx.fp_inputs)
    return collector.result(ctx)
