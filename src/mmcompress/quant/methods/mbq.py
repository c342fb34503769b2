"""MBQ: Modality-Balanced Quantization (Li et al., CVPR 2025), as a baseline in our pipeline.

The scale search of AWQ/SmoothQuant with **one shared scale per channel**, but the reconstruction
error of each token is weighted by its modality's gradient sensitivity (:mod:`.gradients`)::

    α* = argmin_α Σ_t λ_{m(t)} || x_t Wᵀ − Q_a(x_t / s) Q_w(W ⊙ s)ᵀ ||²,   λ_T = 1

Scale family: SmoothQuant's ``s = max|X|^α / max|W|^(1−α)`` when activations are quantized
(W8A8, W4A8, W4A6), AWQ's ``s = mean|X|^α`` (normalised) for weight-only schemes (W4A16); the
identity ``s = 1`` is always a candidate.  The smoothed groups are SmoothQuant's (q/k/v, o where the
division folds, gate/up); down_proj keeps ``s ≡ 1`` as in SmoothQuant and MASQuant, so the three
methods differ only in how they choose ``s``.
"""

from __future__ import annotations

import torch

from ...models.modality import MODALITY_NAMES, TEXT
from ... import options as opt
from .awq import ScaleSearch
from .masquant import check_loss_weights
from .smoothquant import DEFAULT_GROUPS, smoothing_factors


class MBQ(ScaleSearch):
    name = "mbq"
    groups = DEFAULT_GROUPS
    OPTIONS = {**ScaleSearch.OPTIONS, "loss_weights": check_loss_weights, "probe_samples": opt.integer(1)}

    def __init__(self, scheme, grid: int = 20, max_tokens: int = 4096, seed: int = 0, loss_weights="auto",
                 probe_samples: int = 16, loss: str | None = None, clip: bool | None = None):
        super().__init__(scheme, grid, max_tokens, seed, loss, clip)
        self.loss_weights_spec = loss_weights
        self.probe_samples = probe_samples
        self.loss_weights = {TEXT: 1.0}
        self.summary = {}

    def config(self) -> dict:
        spec = self.loss_weights_spec
        return {**super().config(), "loss_weights": spec if isinstance(spec, str) else dict(spec)}

    def prepare(self, model, adapter, samples=None) -> None:
        from .gradients import modality_gradient_ratios
        from .masquant import LOSS_WEIGHT_PRESETS, _mod_id

        spec = self.loss_weights_spec
        if isinstance(spec, dict):
            self.loss_weights = {TEXT: 1.0, **{_mod_id(k): float(v) for k, v in spec.items()}}
        elif spec in LOSS_WEIGHT_PRESETS:
            self.loss_weights = {TEXT: 1.0, **LOSS_WEIGHT_PRESETS[spec]}
        elif spec == "auto":
            ratios = modality_gradient_ratios(model, adapter, (samples or [])[: self.probe_samples]) if adapter.routed else {}
            self.loss_weights = {TEXT: 1.0, **ratios}
        else:
            raise ValueError(f"loss_weights must be auto, a preset or a dict, got {spec!r}")
        self.summary["loss_weights"] = {MODALITY_NAMES[m]: round(v, 4) for m, v in self.loss_weights.items()}

    def method_summary(self) -> dict | None:
        return self.summary

    def candidate(self, x_abs_mean, x_absmax, w_absmax, alpha):
        if self.scheme.weight_only:
            return super().candidate(x_abs_mean, x_absmax, w_absmax, alpha)
        return smoothing_factors(x_absmax, w_absmax, alpha)

    def token_weights(self, ids):
        w = torch.ones(ids.shape, dtype=torch.float32)
        for m, v in self.loss_weights.items():
            w[ids == m] = v
        return w
