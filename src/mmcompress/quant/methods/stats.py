"""Per-modality activation statistics of the linears of one decoder layer (shared by methods).

For a group of linears reading the same input ``X`` (see :class:`~mmcompress.models.adapters.LinearGroup`),
per modality id ``m`` over the calibration tokens ``t`` with ``mod(t) = m``:

* ``absmax[m]_j = max_t |X_tj|``                   (SmoothQuant/MASQuant initialisation, E2/E7)
* ``moment[m] = Σ_t X_tᵀ X_t`` in float64          (CMC whitening, E11; optional, d×d per group)
* ``count[m]``                                     number of tokens

Modality ids follow :mod:`mmcompress.models.modality`; video is counted as text (``method_modalities``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ...engine import LayerContext
from ...models.modality import method_modalities


@dataclass
class GroupStats:
    dim: int
    absmax: dict[int, torch.Tensor] = field(default_factory=dict)
    moment: dict[int, torch.Tensor] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)

    @property
    def modalities(self) -> list[int]:
        return sorted(m for m, n in self.count.items() if n > 0)

    def absmax_all(self) -> torch.Tensor:
        return torch.stack([self.absmax[m] for m in self.modalities]).amax(0)

    def all_reduce(self, world, moments: bool) -> None:
        """Combine the statistics of every rank (:mod:`mmcompress.distributed`): a modality a rank did
        not see counts as zeros there, neutral for the maxima of ``|x|`` and for the sums."""
        for m in world.union(self.count):
            self.count[m] = world.sum(self.count.get(m, 0))
            zeros = torch.zeros(self.dim, dtype=torch.float64)
            self.absmax[m] = world.max(self.absmax.get(m, zeros))
            if moments:
                self.moment[m] = world.sum(self.moment.get(m, torch.zeros(self.dim, self.dim, dtype=torch.float64)))


class InputCollector:
    """Statistics of the inputs of groups of linears, from what :meth:`record` ``(group name, x, ids)`` is given:
    in a pass of its own (``ctx.collect(c.modules(layer), c.record, ...)``) or hooked on the engine's
    uncompressed pass (:meth:`observers`, :meth:`~mmcompress.engine.Method.watch_fp_pass`)."""

    def __init__(self, groups):
        self.groups = list(groups)
        self.stats: dict = {}

    def record(self, name: str, x: torch.Tensor, ids: torch.Tensor) -> None:
        raise NotImplementedError

    def modules(self, layer) -> dict:
        return {g.name: g.input_module(layer) for g in self.groups}

    def observers(self, layer) -> list:
        return [(mod, functools.partial(self.record, name)) for name, mod in self.modules(layer).items()]


class GroupStatsCollector(InputCollector):
    """Gathers :class:`GroupStats` of ``groups`` (``moments``: with ``C_m``)."""

    def __init__(self, groups, moments: bool = False):
        super().__init__(groups)
        self.moments = moments

    def record(self, name: str, x: torch.Tensor, ids: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        ids = ids.reshape(-1).to(x.device)
        ids = method_modalities(ids)
        st = self.stats.setdefault(name, GroupStats(x.shape[-1]))
        for m in ids.unique().tolist():
            xm = x[ids == m]
            amax = xm.abs().amax(0).double().cpu()
            st.absmax[m] = amax if m not in st.absmax else torch.maximum(st.absmax[m], amax)
            st.count[m] = st.count.get(m, 0) + xm.shape[0]
            if self.moments:
                xd = xm.double()
                g = (xd.T @ xd).cpu()
                st.moment[m] = g if m not in st.moment else st.moment[m] + g

    def result(self, ctx: LayerContext) -> dict[str, GroupStats]:
        for g in self.groups:  # a group no token reached (an MoE expert the router never chose): empty statistics
            self.stats.setdefault(g.name, GroupStats(g.modules(ctx.layer)[0].in_features))
        if ctx.world.size > 1:
            for g in self.groups:
                self.stats[g.name].all_reduce(ctx.world, self.moments)
        return self.stats


def collect_group_stats(ctx: LayerContext, groups, *, moments: bool = False, inputs=None) -> dict[str, GroupStats]:
    """Run the calibration samples through ``ctx.layer`` and gather per-modality input statistics."""
    collector = GroupStatsCollector(groups, moments)
    ctx.collect(collector.modules(ctx.layer), collector.record, inputs=inputs)
    return collector.result(ctx)
