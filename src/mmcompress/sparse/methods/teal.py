"""TEAL: training-free magnitude activation sparsity (Liu et al., ICLR 2025; docs/larosa.md §6).

For each projection input, ``s_t(x)_i = x_i·1[|x_i| ≥ t]`` with a threshold ``t`` fixed offline so
that a fraction ``p`` of the calibration activations fall below it.  Calibration streams the dense
model chain one layer at a time and keeps a seeded random sample of ``|x|`` per activation (h1: q,k,v
input; h2: o input; h3: gate,up input; h4: down input); the threshold for level ``p`` is its
empirical ``p``-quantile (equivalent to TEAL's ``icdf(0.5 + p/2)`` for a symmetric distribution,
without the symmetry assumption).  Allocation: ``uniform`` (every projection at ``p``: the model-level
sparsity is p in expectation; realised sparsity fluctuates per token).  Prefill policies: ``all``
(LaRoSA's evaluation protocol), ``last_half`` (TEAL's own), ``none`` (dense prefill).
"""

from __future__ import annotations

import torch

from ...engine import Method, run_layerwise
from .. import plan as plans
from ..merge import inner_layer
from .larosa import PREFILL_POLICIES, _set, make_sparse_linear


class MagnitudeSampler(Method):
    """Engine method that only observes: a seeded sample of ``|x|`` per named module input/output."""

    name = "magnitude-sampler"

    def __init__(self, select, max_values: int = 1 << 18, seed: int = 0, nsamples: int = 1):
        self.select = select  # (layer, adapter) -> {key: (module, "input" | "output")}
        self.per_call = max(1024, max_values // max(nsamples, 1) + 1)
        self.gen = torch.Generator().manual_seed(seed)
        self.values: list[dict[str, torch.Tensor]] = []
        self._handles, self._cur = [], None

    def _flush(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._cur is not None:
            self.values.append({k: torch.sort(torch.cat(v)).values for k, v in self._cur.items()})
            self._cur = None

    def _take(self, key, t):
        a = t.detach().reshape(-1).abs().float().cpu()
        if a.numel() > self.per_call:
            a = a[torch.randint(0, a.numel(), (self.per_call,), generator=self.gen)]
        self._cur[key].append(a)

    def step(self, ctx) -> None:
        self._flush()
        self._cur = {}
        for key, (mod, where) in self.select(inner_layer(ctx.layer), ctx.adapter).items():
            self._cur[key] = []
            if where == "input":
                self._handles.append(mod.register_forward_pre_hook(lambda m, args, key=key: self._take(key, args[0])))
            else:
                self._handles.append(mod.register_forward_hook(lambda m, args, out, key=key: self._take(key, out)))

    def finalize(self, model, adapter) -> None:
        self._flush()


def quantile(sorted_values: torch.Tensor, level: float) -> float:
    """Threshold ``t`` such that a fraction ``level`` of the sample lies below it."""
    if level <= 0:
        return 0.0
    n = sorted_values.numel()
    return float(sorted_values[min(n - 1, int(level * n))])


def _teal_select(layer, adapter):
    out = {}
    for g in adapter.groups:
        out[plans.GROUP_ACTIVATION[g.name]] = (layer.get_submodule(g.readers[0]), "input")
    return out


def calibrate_magnitudes(model, adapter, samples, device="cpu", progress=True, select=_teal_select,
                         max_values: int = 1 << 18, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    sampler = MagnitudeSampler(select, max_values=max_values, seed=seed, nsamples=len(samples))
    try:
        run_layerwise(model, adapter, sampler, samples, device=device, progress=progress)
    finally:
        sampler._flush()
    return sampler.values


def teal(model, adapter, samples, sparsity: float, *, plan: str = "uniform", prefill: str = "all", device="cpu",
         progress=True, magnitudes=None) -> dict:
    """Apply TEAL in place (per-projection thresholds); returns a description."""
    if plan not in ("uniform", "exact"):
        raise ValueError(f"TEAL supports the uniform allocation only (every projection at p), not {plan!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"prefill policy must be one of {PREFILL_POLICIES}, got {prefill!r}")
    shapes = plans.layer_shapes(adapter)
    if magnitudes is None:
        magnitudes = calibrate_magnitudes(model, adapter, samples, device=device, progress=progress)
    thresholds = []
    for i, layer in enumerate(adapter.layers):
        layer = inner_layer(layer)
        th = {}
        for g in adapter.groups:
            act = plans.GROUP_ACTIVATION[g.name]
            t = quantile(magnitudes[i][act], sparsity)
            th[act] = t
            for path in g.readers:
                mod = layer.get_submodule(path)
                _set(layer, path, make_sparse_linear(mod, mod.in_features, prefill, mode="threshold", threshold=t))
        thresholds.append(th)
    levels = [{p: sparsity for p in plans.PROJECTIONS} for _ in shapes]
    chosen = plans.per_projection(shapes, levels, "uniform", sparsity)
    return {"method": "teal", "prefill": prefill, **chosen.summary(),
            "thresholds": [{k: round(v, 6) for k, v in th.items()} for th in thresholds],
            "note": "threshold sparsity: the realised per-token sparsity fluctuates around the target"}
