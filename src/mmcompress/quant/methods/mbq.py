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

from dataclasses import dataclass

import torch

from ...models.modality import MODALITY_NAMES, TEXT
from ... import options as opt
from .awq import ScaleSearch, ScaleSearchOptions
from .gradients import LOSS_WEIGHTS_HELP, check_loss_weights, parse_loss_weights, resolve_loss_weights
from .smoothquant import DEFAULT_GROUPS, smoothing_factors


@dataclass(frozen=True)
class MBQOptions(ScaleSearchOptions):
    loss_weights: object = opt.option("auto", check_loss_weights, LOSS_WEIGHTS_HELP, parse=parse_loss_weights)
    probe_samples: int = opt.option(16, opt.integer(1), "calibration samples of the gradient probe (loss weights auto)")


class MBQ(ScaleSearch):
    name = "mbq"
    groups = DEFAULT_GROUPS
    Options = MBQOptions

    def __init__(self, scheme, **options):
        super().__init__(scheme, **options)
        self.loss_weights = {TEXT: 1.0}  # resolved in prepare() from the option (self.options.loss_weights)
        self.summary = {}

    def prepare(self, model, adapter, samples=None) -> None:
        self.loss_weights, _ = resolve_loss_weights(self.options.loss_weights, model, adapter, samples,
                                                    self.probe_samples)
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
