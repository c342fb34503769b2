"""CATS: contextually-aware thresholding of the gate activation (Lee et al., 2024; docs/methods.md).

``CATS(z) = z·1[|z| ≥ t]`` on ``z = act(x W_gateᵀ)`` in every gated MLP, with ``t`` per layer the
empirical quantile of ``|z|`` on calibration data at the MLP sparsity ``k``.  A zero in ``z`` skips
the matching row of up_proj and column of down_proj, so under the model-level accounting (q, k, v,
o, gate, up, down) only up and down count::

    S_model = k·(|W_up| + |W_down|) / Σ|W|   ≤   2fd / block mass   (44.6% for LLaMA2-7B).

A target above that is unreachable: k is capped (``max_mlp_sparsity``, default 0.99) and the
achieved model-level sparsity is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import options as opt
from .. import plan as plans
from ..merge import ThresholdedActivation, inner_layer
from .base import SparseMethod, SparseOptions
from .teal import ThresholdLayers, calibrate_magnitudes, quantile


def _cats_select(layer, adapter):
    gate = next(layer.get_submodule(g.readers[0]) for g in adapter.groups if g.name == "mlp_in")
    return {"gate_act": (layer.get_submodule(adapter.mlp_activation(adapter.layer_index)), "output", gate.out_features)}


def cats(model, adapter, samples, sparsity: float, *, prefill: str = "all", max_mlp_sparsity: float = 0.99,
         device="cpu", progress=True, magnitudes=None) -> dict:
    """Apply CATS in place; ``sparsity`` is the target *model-level* sparsity."""
    _check(prefill)
    shapes = plans.layer_shapes(adapter)
    if magnitudes is None:
        magnitudes = calibrate_magnitudes(model, adapter, samples, device=device, progress=progress,
                                          select=_cats_select)
    installed = [install_threshold(adapter, i, shapes[i], magnitudes[i], sparsity, prefill, max_mlp_sparsity)
                 for i in range(len(adapter.layers))]
    return _description(shapes, installed, sparsity, prefill, max_mlp_sparsity)


def _check(prefill: str) -> None:
    if prefill not in ("all", "none"):
        raise ValueError(f"CATS supports prefill policies 'all' and 'none', not {prefill!r}")


def install_threshold(adapter, i: int, shape, magnitudes: dict, sparsity: float, prefill: str,
                      max_mlp_sparsity: float) -> tuple[float, float]:
    """Threshold decoder layer ``i``'s MLP activation at the MLP sparsity ``k`` that gives the target
    model-level sparsity (capped at ``max_mlp_sparsity``); returns ``(k, t)``."""
    layer = inner_layer(adapter.layers[i])
    k = min(sparsity * shape.total / (shape.masses["up"] + shape.masses["down"]), max_mlp_sparsity)
    t = quantile(magnitudes["gate_act"], k)
    path = adapter.mlp_activation(i)
    act = layer.get_submodule(path)
    if isinstance(act, ThresholdedActivation):
        act.threshold = t
    else:
        act = ThresholdedActivation(act, t)
        layer.set_submodule(path, act)
    act.sparse_prefill = prefill == "all"
    return k, t


def _description(shapes, installed, sparsity: float, prefill: str, max_mlp_sparsity: float) -> dict:
    chosen = plans.per_projection(shapes, [{"up": k, "down": k} for k, _ in installed], "cats", sparsity)
    out = {"method": "cats", "prefill": prefill, **chosen.summary(), "thresholds": [round(t, 6) for _, t in installed],
           "max_model_sparsity": round(max_mlp_sparsity * sum(s.masses["up"] + s.masses["down"] for s in shapes)
                                       / sum(s.total for s in shapes), 6)}
    if any(sparsity * s.total / (s.masses["up"] + s.masses["down"]) > max_mlp_sparsity for s in shapes):
        out["note"] = (f"target {sparsity} is above what CATS can reach (MLP sparsity capped at {max_mlp_sparsity}); "
                       f"achieved model-level sparsity {out['model_sparsity']}")
    return out


@dataclass(frozen=True)
class CATSOptions(SparseOptions):
    plan: str = opt.option("exact", opt.choice("exact", "uniform"), "one allocation (a threshold per layer at the "
                                                                     "MLP level): the name is accepted, not used")
    prefill: str = opt.override(SparseOptions, "prefill", check=opt.choice("all", "none"))
    max_mlp_sparsity: float = opt.option(0.99, opt.real(0, 1, hi_open=True), "cap of the MLP sparsity")


class CATS(SparseMethod):
    """CATS (see the module docstring): a threshold on the gated MLP's activation."""

    name = "cats"
    Options = CATSOptions

    def layer_method(self) -> ThresholdLayers:
        sparsity, prefill = self.sparsity, self.options.prefill
        cap = self.options.max_mlp_sparsity
        _check(prefill)
        layers = ThresholdLayers(
            "cats", _cats_select,
            lambda adapter, i, mags: install_threshold(adapter, i, layers.shapes[i], mags, sparsity, prefill, cap),
            lambda shapes, installed: _description(shapes, installed, sparsity, prefill, cap), config=self.config())
        return layers
