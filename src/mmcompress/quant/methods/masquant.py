"""MASQuant: Modality-Aware Smoothing Quantization (Hu et al., CVPR 2026, arXiv 2603.04800).

Notation (one linear ``y = x Wᵀ + b``, ``W ∈ R^{out×in}``; modalities ``m ∈ {T, V, A}``):

* ``s_m ∈ R^{in}``  the smoothing vector of modality ``m`` (``smoothing[m]`` here); ``x / s_m``
  divides channel ``j`` by ``s_mj``; ``W ⊙ s_m`` multiplies column ``j`` of ``W`` by ``s_mj``.
* ``Q_w``, ``Q_a``  weight and per-token activation fake-quantizers (:mod:`..quantizer`).

**Modality-Aware Smoothing (MAS).**  Each smoothed linear (q, k, v, o, gate, up; down keeps
``s ≡ 1``) learns one vector per modality, initialised per modality as SmoothQuant would (E7)::

    s_m = clamp(max_{t∈m} |x_t|^α / max_i |W_i|^(1−α), ≥ 1e-5)

and trained layer by layer on the cached inputs with the training forward (E8, one quantized weight
per modality)::

    Y = Σ_m Q_a((M_m ⊙ X) / s_m) · Q_w(W ⊙ s_m)ᵀ + b

to minimise the modality-balanced reconstruction loss (E9, a weighted mean absolute error)::

    L_MBR = (Σ_{t∈T} ||Δ_t||₁ + λ_V Σ_{t∈V} ||Δ_t||₁ + λ_A Σ_{t∈A} ||Δ_t||₁) / (L·d),   Δ = Ŷ − Y_fp

**Cross-Modal Compensation (CMC).**  One quantized weight ``Ŵ = Q_w(W ⊙ s_T)`` is stored.  For
``m ≠ T`` the residual ``ΔW_m = W ⊙ s_m − Ŵ`` is approximated by ``L_m R_m`` of rank ``r``, optimal
in the space whitened by the modality's smoothed activations ``X̃_m = X_m / s_m`` (E11–E16)::

    C_m = X̃_mᵀ X̃_m = U Σ Uᵀ,   T_m = Σ^{1/2} Uᵀ,   T_m ΔW_mᵀ = P S Qᵀ,
    L_m = U Σ^{−1/2} P_{:r},   R_m = S_{:r} Q_{:r}ᵀ,   min_{rank ≤ r} ||X̃_m (ΔW_mᵀ − L R)||_F

and the deployed layer computes, for a token of modality ``m`` (E17; text and decode tokens pay
nothing extra)::

    y_t = Q_a(x_t / s_m) Ŵᵀ + b + 1[m ≠ T] · (x_t / s_m) L_m R_m

**Whitening data.**  ``C_m`` sums the tokens of modality ``m`` only, taken from the uncompressed
model's inputs to the linear.  By default they come from the calibration set (its image tokens for
``C_V``, its audio tokens for ``C_A``); given a separate whitening set (``quantize(whitening=...)``,
``--whiten-calib``), as the paper does with image-only and audio-only sets, they come from that set's
tokens of modality ``m`` instead, and nothing is trained on it.

**Damping rule** (:func:`whitened_low_rank`): ``C_m ← C_m + λ · (tr C_m / d_in) · I`` with ``λ =
damping`` (default ``1e-6``).  The reference uses no damping and an explicit inverse; that breaks when
``C_m`` is rank-deficient, which it is whenever a modality has fewer tokens than ``d_in`` (32 images of
16 tokens = 512 image tokens for a 576-wide model), and with ``λ = 0`` a rank-deficient ``C_m`` gives
NaN factors.  ``λ = 1e-6`` makes the factorisation exist while changing the whitened objective by about
``1e-6`` relative.  On held-out tokens (synthetic, 40 calibration tokens for 64 channels, rank 8) the
fit's error is 0.068 for every ``λ`` from ``1e-12`` to ``1e-4``, 0.071 at ``1e-2``, 0.085 at ``0.1``,
against 0.68 for the unwhitened SVD (``tests/test_fidelity_data.py::test_whitening_damping_holds_out_of_sample``).
On omni-mini's layer-2 q_proj (320 image tokens for 576 channels, rank 32) the held-out error is 0.050
for every ``λ`` from 0 to ``1e-4``, 0.054 at ``1e-2``, 0.076 at ``0.1``, unwhitened 0.529; the fit-set
error is 0.018, so what costs out of sample is the missing tokens, not the damping: a larger
per-modality whitening set is the remedy (``benchmarks/whitening_damping_omni-mini.md``).

Differences from the reference code: explicit configuration, smoothing
vectors kept positive with one floor used everywhere, fp32 master copies of ``s``, covariances in
float64 with damping and ``T⁻¹ = U Σ^{−1/2}``, calibration disjoint from evaluation.  On a text-only
model every token is text and MASQuant reduces to learned SmoothQuant (run-time smoothing vectors
trained with the reconstruction loss).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ... import options as opt
from ...engine import LayerContext
from ...models.modality import AUDIO, IMAGE, MODALITY_NAMES, TEXT, current_modality_ids
from ...specs import register_quant_module
from ..kernels.fake_quant_cpu import smoothed_fake_quant_weight
from ..linear import QuantLinear, modality_rows
from ..quantizer import QuantScheme, fake_quantize_activation, fake_quantize_weight
from .base import QuantMethod, weight_column_absmax
from .gradients import (LOSS_WEIGHTS_HELP, check_loss_weights, modalities_present, parse_loss_weights,
                        resolve_loss_weights)
from .smoothquant import smoothing_factors
from .stats import GroupStatsCollector, collect_group_stats

log = logging.getLogger(__name__)

ROWS = 3  # smoothing rows: text, image (vision), audio
SMOOTHED_GROUPS = ("attn_in", "attn_out", "mlp_in")


# -- modules -------------------------------------------------------------------------------------


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    ids = current_modality_ids()
    if ids is None or ids.shape != x.shape[:-1]:
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    return modality_rows(ids.to(x.device), ROWS)


class MASTrainLinear(nn.Module):
    """Training form of a smoothed linear (E8): one quantized weight per modality."""

    def __init__(self, linear: nn.Module, scheme: QuantScheme, init: torch.Tensor, trainable: bool = True,
                 shared: nn.Parameter | None = None):
        super().__init__()
        self.weight = linear.weight.detach().float()
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.scheme = scheme
        if shared is not None:
            self.smoothing = shared
        elif trainable:
            self.smoothing = nn.Parameter(init.float().clone())
        else:
            self.register_buffer("smoothing", init.float().clone())

    def quantized_weight(self, m: int) -> torch.Tensor:
        """``Q_w(W ⊙ s_m)``, differentiable in ``s_m`` (one pass per row where the kernel takes it)."""
        s = self.scheme
        return smoothed_fake_quant_weight(self.weight, self.smoothing[m], s.wbits, s.group_size, s.sym)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _token_rows(x).reshape(-1)
        xf = x.reshape(-1, x.shape[-1]).float()
        present = rows.unique().tolist()
        if len(present) == 1:  # one modality (a text-only sample): every row, no gather/scatter (same values)
            m = present[0]
            out = fake_quantize_activation(xf / self.smoothing[m], self.scheme.abits) @ self.quantized_weight(m).T
        else:
            out = xf.new_zeros(xf.shape[0], self.weight.shape[0])
            for m in present:
                sel = rows == m
                xm = fake_quantize_activation(xf[sel] / self.smoothing[m], self.scheme.abits)
                out = out.index_put((sel.nonzero().squeeze(1),), xm @ self.quantized_weight(m).T)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def cmc_correction(x_smoothed: torch.Tensor, ids: torch.Tensor | None, left: torch.Tensor,
                   right: torch.Tensor) -> torch.Tensor | None:
    """E17's ``1[m ≠ T] · (x_t / s_m) L_m R_m`` per token; ``None`` when every token is text (decode)."""
    if ids is None or ids.shape != x_smoothed.shape[:-1]:
        return None
    rows = modality_rows(ids.to(x_smoothed.device), left.shape[0])
    present = [m for m in rows.unique().tolist() if m != TEXT]
    if not present:
        return None
    out = x_smoothed.new_zeros(*x_smoothed.shape[:-1], right.shape[-1])
    for m in present:
        sel = rows == m
        out[sel] = (x_smoothed[sel] @ left[m].to(x_smoothed.dtype)) @ right[m].to(x_smoothed.dtype)
    return out


@register_quant_module
class MASLinear(QuantLinear):
    """Deployed MASQuant linear (E17): one quantized weight ``Ŵ = Q_w(W ⊙ s_T)``, per-modality
    run-time smoothing rows, and per-modality low-rank compensation ``L_m R_m`` (``rank > 0``).

    ``split=True`` instead stores one fake-quantized weight per modality (the training form E8,
    "MAS only"): a research variant used to measure what CMC approximates, not a deployment format.
    """

    def __init__(self, in_features, out_features, bias, scheme, smoothing_rows=ROWS, dtype=torch.float32, device=None,
                 rank: int = 0, split: bool = False):
        super().__init__(in_features, out_features, bias, scheme, smoothing_rows, dtype=dtype, device=device)
        self.rank, self.split = int(rank), bool(split)
        if self.rank:
            self.register_buffer("cmc_left", torch.zeros(smoothing_rows, in_features, self.rank, dtype=dtype, device=device))
            self.register_buffer("cmc_right", torch.zeros(smoothing_rows, self.rank, out_features, dtype=dtype, device=device))
        if self.split:
            self.register_buffer("split_weight", torch.zeros(smoothing_rows, out_features, in_features, dtype=dtype,
                                                             device=device))

    def spec(self) -> dict:
        return {**super().spec(), "rank": self.rank, "split": self.split}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "MASLinear":
        dtype = getattr(torch, spec.get("dtype", "float32"))
        q = cls(spec["in_features"], spec["out_features"], spec["bias"], QuantScheme(**spec["scheme"]),
                spec.get("smoothing_rows", ROWS), dtype=dtype, device=device, rank=spec.get("rank", 0),
                split=spec.get("split", False))
        if spec.get("packed"):
            q._make_packed_buffers(device)
        return q

    def correction(self, x_smoothed: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor | None:
        return cmc_correction(x_smoothed, ids, self.cmc_left, self.cmc_right) if self.rank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return super().forward(x)
        ids = current_modality_ids()
        rows = (modality_rows(ids.to(x.device), ROWS) if ids is not None and ids.shape == x.shape[:-1]
                else torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device))
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        for m in rows.unique().tolist():
            sel = rows == m
            xm = fake_quantize_activation(x[sel] / self.input_smoothing[m].to(x.dtype), self.scheme.abits)
            out[sel] = xm @ self.split_weight[m].to(x.dtype).T
        return out if self.bias is None else out + self.bias


# -- the method ----------------------------------------------------------------------------------


def cmc_rank(rank_ratio: float, in_features: int, out_features: int, floor: int = 32) -> int:
    """``r = max(floor, ⌊ρ·min(in, out)⌋)`` for ``ρ ≤ 1`` (``ρ = 1``: full rank), ``r = ρ`` for ``ρ > 1``."""
    full = min(in_features, out_features)
    if rank_ratio <= 0:
        return 0
    r = int(rank_ratio) if rank_ratio > 1 else max(floor, int(math.floor(rank_ratio * full)))
    return min(r, full)


def top_svd(a: torch.Tensor, rank: int, *, oversample: int = 16, power_iters: int = 4, left: torch.Tensor | None = None):
    """The ``rank`` leading singular triplets ``(P_r, σ_r, Q_rᵀ)`` of ``a`` (of ``left @ a`` when ``left`` is
    given: a square factor applied on the fly, never multiplied into ``a``).

    Exact SVD when ``rank`` is a large part of ``min(a.shape)``; otherwise a randomized range finder
    (Halko et al. 2011: Gaussian sketch with ``q = rank + oversample`` columns, ``power_iters`` power
    iterations with re-orthonormalisation) with a fixed seed, so calibration stays reproducible, and the
    exact SVD of the ``q``-row projection ``Yᵀa``.  With the spectra of weight residuals its error is
    within a fraction of a percent of the exact SVD's, at a small fraction of its cost (the CMC rank floor
    32 against 576..4864 wide layers).  The range finder only multiplies by ``a`` and ``aᵀ``, so a
    ``left`` factor costs ``in²·q`` per product instead of ``in²·out`` once."""
    m, n = (a.shape[0] if left is None else left.shape[0]), a.shape[1]
    full = min(m, n)
    q = min(full, rank + oversample)
    if left is not None and (4 * q >= full or (2 * power_iters + 2) * q >= n):  # cheaper multiplied in
        a, left = left @ a, None
    if 4 * q >= full:
        p, s, qh = torch.linalg.svd(a, full_matrices=False)
        return p[:, :rank], s[:rank], qh[:rank]
    mul = (lambda x: a @ x) if left is None else (lambda x: left @ (a @ x))
    rmul = (lambda y: a.T @ y) if left is None else (lambda y: a.T @ (left.T @ y))
    y = _orthonormal(mul(_sketch(n, q, a.dtype, a.device)))[0]
    for _ in range(power_iters):
        y = _orthonormal(mul(_orthonormal(rmul(y))[0]))[0]
    qb, rb = _orthonormal(rmul(y))  # (Yᵀa)ᵀ = Q_b R_b, so Yᵀa = R_bᵀ Q_bᵀ and its SVD is R_bᵀ's (q × q)
    u, s, vh = torch.linalg.svd(rb.T)
    return (y @ u)[:, :rank], s[:rank], (vh @ qb.T)[:rank]


def _orthonormal(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, R)`` with ``y = Q R``, ``Q`` with orthonormal columns, ``R`` upper triangular: CholeskyQR2
    (Fukaya et al. 2014: two passes of ``R = chol(yᵀy)``, ``Q = y R⁻¹``; orthogonal to float64 round-off
    when ``y``'s condition number is well under ``u^{-1/2}`` ≈ 1e8), else Householder QR.  The first
    pass's ``R`` must have a diagonal spread under 1e6 and the second pass's ``R`` a diagonal within
    [0.5, 2] (the first ``Q`` was nearly orthonormal), or the Householder QR is taken.  The power
    iterations' blocks are tall and thin (``in`` or ``out`` × ``q``): two GEMMs and two triangular solves
    against LAPACK's column-by-column Householder QR."""
    r1, info = torch.linalg.cholesky_ex(y.T @ y, upper=True)
    if int(info) == 0:
        d = r1.diagonal().abs()
        if float(d.min()) > 1e-6 * float(d.max()):
            q1 = torch.linalg.solve_triangular(r1, y, upper=True, left=False)
            r2, info = torch.linalg.cholesky_ex(q1.T @ q1, upper=True)
            d2 = r2.diagonal()
            if int(info) == 0 and float(d2.min()) > 0.5 and float(d2.max()) < 2.0:
                return torch.linalg.solve_triangular(r2, q1, upper=True, left=False), r2 @ r1
    return torch.linalg.qr(y)


@functools.lru_cache(maxsize=16)
def _sketch(n: int, q: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The range finder's Gaussian test matrix ``[n, q]``, seed 0 (the same for every call of a shape:
    drawn once; callers only read it)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(n, q, generator=g, dtype=dtype).to(device)


def whitening(moment: torch.Tensor, damping: float = 1e-6) -> tuple:
    """The factor ``T`` (``TᵀT = C + λ·mean(diag C)·I``) of :func:`whitened_low_rank`, as
    ``("chol", T)`` or, when the Cholesky factorisation fails, ``("eig", U, Σ^{1/2})``: computed once per
    (group, modality) and shared by the group's readers, which see the same ``C_m`` and smoothing row."""
    c = moment.double()
    c = c + damping * c.diagonal().mean().clamp(min=1e-30) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) == 0:
        return ("chol", chol.T)  # upper triangular, tᵀt = C
    evals, u = torch.linalg.eigh(c)
    sq = evals.clamp(min=max(damping, 1e-12) * evals.clamp(min=0).mean().clamp(min=1e-30)).sqrt()
    return ("eig", u, sq)


def whitened_low_rank(delta_w: torch.Tensor, moment: torch.Tensor | None, rank: int, damping: float = 1e-6,
                      factor: tuple | None = None):
    """Factors ``L [in×r]``, ``R [r×out]`` minimising ``||X̃ (ΔWᵀ − L R)||_F`` given ``C = X̃ᵀX̃``
    (``moment``; ``None`` = plain SVD, the no-whitening ablation).  All in float64.

    With any ``T`` such that ``TᵀT = C`` the objective is ``||T ΔWᵀ − T L R||_F``, so ``T L R`` is the
    rank-``r`` truncated SVD ``P_r Σ_r Q_rᵀ`` of ``T ΔWᵀ`` (Eckart–Young) and ``L = T⁻¹ P_r``,
    ``R = Σ_r Q_rᵀ``.  Damping rule: ``T = Uᵀ`` from the Cholesky factor of ``C + λ·mean(diag C)·I``
    (``λ`` = ``damping``); when that fails (``λ = 0`` and ``C`` rank-deficient) an eigen-decomposition
    with eigenvalues floored at ``max(λ, 1e-12)·mean(eigenvalues)`` is the fallback, so the factors
    stay finite.  ``factor``: :func:`whitening` of ``moment`` computed before (shared by readers)."""
    dwt = delta_w.double().T  # [in, out]
    if moment is None:
        p, s, qh = top_svd(dwt, rank)
        return p, s[:, None] * qh
    factor = factor if factor is not None else whitening(moment, damping)
    if factor[0] == "chol":
        t = factor[1]
        p, s, qh = top_svd(dwt, rank, left=t)
        left = torch.linalg.solve_triangular(t, p, upper=True)
        return left, s[:, None] * qh
    _, u, sq = factor
    p, s, qh = top_svd(dwt, rank, left=sq[:, None] * u.T)  # T = Σ^{1/2} Uᵀ
    return (u / sq[None, :]) @ p, s[:, None] * qh


def check_rank(v):
    """A ratio in [0, 1] of min(in, out), or an absolute rank (an integer > 1)."""
    opt.real(0)(v)
    if v > 1 and not float(v).is_integer():
        raise ValueError(f"must be a ratio in [0, 1] or an integer rank > 1, got {v!r}")
    return v


def check_divergence(v):
    if not (v in ("free", "cmc") or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)):
        raise ValueError(f"must be 'free', 'cmc' or a channel count >= 0, got {v!r}")
    return v


def parse_divergence(text: str):
    """The flag's text: ``free``, ``cmc`` or a channel count."""
    if text in ("free", "cmc"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected free, cmc or a channel count, got {text!r}") from None


@dataclass(frozen=True)
class MASQuantOptions(opt.Options):
    """MASQuant's options (recipe keys; ``--flag`` on the CLI) with their defaults and validators."""

    alpha: float = opt.option(0.5, opt.real(0, 1), "smoothing migration strength α of the initialisation (E7)")
    epochs: int = opt.option(2, opt.integer(0), "training epochs per layer")
    lr: float = opt.option(5e-2, opt.real(0, lo_open=True), "learning rate of the smoothing vectors")
    loss_weights: object = opt.option("auto", check_loss_weights, LOSS_WEIGHTS_HELP, parse=parse_loss_weights)
    cmc: str = opt.option("whitened", opt.choice("whitened", "plain", "none", "split"),
                          "cross-modal compensation (split: one weight per modality, for measurement)")
    rank: float = opt.option(0.05, check_rank, "CMC rank: ratio of min(in, out) if <= 1, else absolute")
    rank_floor: int = opt.option(32, opt.integer(0), "smallest CMC rank")
    cmc_target: str = opt.option("fp", opt.choice("fp", "quantized"), "CMC target weight")
    cmc_bits: int = opt.option(16, opt.bits, "quantize the CMC factors to this many bits (16 = off)")
    tie: bool = opt.option(False, opt.boolean, "tie q/k/v and gate/up vectors per modality")
    scale_floor: float = opt.option(1e-2, opt.real(0, lo_open=True), "floor of the smoothing vectors")
    damping: float = opt.option(1e-6, opt.real(0), "whitening damping λ (C + λ·tr C/d·I)")
    train_samples: int | None = opt.option(None, opt.integer(1, optional=True),
                                           "train on at most this many calibration samples (default: all)", parse=int)
    probe_samples: int = opt.option(16, opt.integer(1), "calibration samples of the gradient probe (loss weights auto)")
    divergence: object = opt.option("cmc", check_divergence,
                                    "channels on which a non-text smoothing vector may differ from the text one: free "
                                    "(the paper), cmc (at most the CMC rank) or N", parse=parse_divergence)


class MASQuant(QuantMethod):
    """MAS (+ CMC).  ``cmc``: ``"whitened"`` (default), ``"plain"`` (unwhitened SVD ablation),
    ``"none"`` (shared weight, per-modality smoothing only) or ``"split"`` (one weight per modality,
    the training form E8, for measurement).

    ``divergence``: ``"cmc"`` (default with CMC) lets each non-text row ``s_m`` differ from ``s_T`` on
    at most ``r`` channels (``r`` = the CMC rank; :func:`project_divergence`, applied at the
    initialisation and after every optimiser step), so that the low-rank correction can represent
    ``W ⊙ (s_m − s_T)``; ``"free"`` is the paper's unconstrained training; an integer sets the budget.
    ``cmc="split"`` takes the same budget as CMC would (so "CMC vs split" compares like with like);
    ``cmc="none"`` trains freely.  Held-out measurements: docs/results.md (issue 17 re-run)."""

    name = "masquant"
    needs_fp_chain = True
    side_sets = ("whitening",)  # the separate per-modality whitening set, if one is given
    Options = MASQuantOptions
    float32_math = True  # the smoothing vectors are trained by backpropagation through the layer
    distributed = True  # statistics combined in collect_group_stats; each training step from the rank holding its sample

    def __init__(self, scheme: QuantScheme, **options):
        super().__init__(scheme, **options)
        self.loss_weights: dict[int, float] = {TEXT: 1.0, IMAGE: 1.0, AUDIO: 1.0}  # resolved in prepare()
        self.summary: dict = {}
        self.whitening = "calibration"  # where C_m comes from: "calibration" or "separate" (set_whitening)
        self.whitening_tokens: dict | None = None

    def set_whitening(self, token_counts: dict) -> None:
        """Whiten with a separate set (its per-modality token counts; the engine carries its samples)."""
        self.whitening, self.whitening_tokens = "separate", dict(token_counts)

    def config(self) -> dict:
        return {**super().config(), "whitening": self.whitening}

    # -- set-up ------------------------------------------------------------------------------------
    def prepare(self, model, adapter, samples=None) -> None:
        self.present = modalities_present(samples, adapter)
        weights, ratios = resolve_loss_weights(self.options.loss_weights, model, adapter, samples, self.probe_samples)
        if ratios is not None:
            self.summary["gradient_ratios"] = {MODALITY_NAMES[m]: v for m, v in ratios.items()}
        weights = {IMAGE: 1.0, AUDIO: 1.0, **weights}  # a modality without a weight counts as text
        self.loss_weights = {TEXT: 1.0, **weights}
        self.summary["loss_weights"] = {MODALITY_NAMES[m]: round(v, 4) for m, v in self.loss_weights.items()}
        self.summary["modalities"] = [MODALITY_NAMES[m] for m in self.present]
        if self.present == [TEXT] or not self.present:
            self.summary["note"] = "text-only calibration: MASQuant reduces to learned SmoothQuant (one text vector)"
            log.info(self.summary["note"])
        self.summary.update({"cmc_bytes": 0, "weight_bytes": 0, "cmc_macs_per_token": {}, "linear_macs_per_token": 0})
        if self.whitening == "separate" and self.cmc == "whitened":
            missing = [MODALITY_NAMES[m] for m in self.present
                       if m != TEXT and not self.whitening_tokens.get(MODALITY_NAMES[m])]
            if missing:
                raise ValueError(f"the whitening set has no {' or '.join(missing)} tokens, but the calibration set has")
            self.summary["whitening"] = {"set": "separate", "tokens": self.whitening_tokens}

    # -- one decoder layer ------------------------------------------------------------------------
    def _stats_plan(self, ctx: LayerContext):
        """The smoothed groups, whether C_m is needed, and the whitening set's context (or ``None``)."""
        groups = [g for g in ctx.adapter.groups if g.role in SMOOTHED_GROUPS]
        need_moments = self.cmc in ("whitened",) and any(m != TEXT for m in self.present)
        wctx = ctx.sides.get("whitening") if self.whitening == "separate" else None
        return groups, need_moments, wctx

    def fp_observers(self, ctx: LayerContext):
        """The statistics of the uncompressed chain, gathered on the engine's pass that computes its outputs."""
        groups, need_moments, wctx = self._stats_plan(ctx)
        return self.watch_fp_pass(ctx, GroupStatsCollector(groups, moments=need_moments and wctx is None))

    def step(self, ctx: LayerContext) -> None:
        layer, adapter, scheme = ctx.layer, ctx.adapter, self.scheme
        groups, need_moments, wctx = self._stats_plan(ctx)
        seen = self.fp_collected(ctx)  # gathered on the engine's uncompressed pass, if it ran
        stats = seen.result(ctx) if seen is not None else \
            collect_group_stats(ctx, groups, moments=need_moments and wctx is None, inputs=ctx.fp_inputs)
        if need_moments and wctx is not None:  # C_m from the whitening set's own tokens of modality m
            wstats = collect_group_stats(wctx, groups, moments=True, inputs=wctx.fp_inputs)
            for g in groups:
                stats[g.name].moment = wstats[g.name].moment
        # E7 initialisation, per group; max|W| over the rows of every reader (q/k/v, gate/up), as SmoothQuant
        init, wrappers, shared = {}, {}, {}
        for g in groups:
            st = stats[g.name]
            w_absmax = weight_column_absmax(g.modules(layer))
            text_s = smoothing_factors(st.absmax.get(TEXT, st.absmax_all()), w_absmax, self.alpha)
            rows = [smoothing_factors(st.absmax[m], w_absmax, self.alpha) if m in st.absmax else text_s
                    for m in range(ROWS)]
            init[g.name] = torch.stack(rows).clamp(min=self.scale_floor).to(w_absmax.device)
            k = self._divergence_channels(layer, g)
            if k is not None:
                project_divergence(init[g.name], self.present, k)
            if self.tie:
                shared[g.name] = nn.Parameter(init[g.name].float().clone())
            for path in g.readers:
                wrappers[path] = MASTrainLinear(layer.get_submodule(path), scheme, init[g.name],
                                                shared=shared.get(g.name))
        originals = {p: layer.get_submodule(p) for p in wrappers}
        for path, w in wrappers.items():
            layer.set_submodule(path, w)
        others = [p for p in adapter.linear_names() if p not in wrappers]
        for path in others:  # down_proj: s ≡ 1, still W/A quantized during training
            layer.set_submodule(path, QuantLinear.from_linear(layer.get_submodule(path), scheme))
        self._budgets = {id(w.smoothing): self._divergence_channels(
            layer, next(g for g in adapter.groups if path in g.readers))
                         for path, w in wrappers.items()}
        losses = self._train(ctx, wrappers) if self.epochs > 0 else []
        whitenings = {}  # (group stats, smoothing, modality) -> (C_m, its whitening factor), this layer's
        for path, w in wrappers.items():
            layer.set_submodule(path, self._deploy(originals[path], w, stats[_group_of(adapter, path)], whitenings))
        for path in others:
            layer.get_submodule(path).pack()
        ctx.info["masquant"] = {
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "tokens": {MODALITY_NAMES[m]: n for m, n in stats[groups[0].name].count.items()},
            "divergence": {p: _divergence(w.smoothing.detach(), self.present) for p, w in wrappers.items()},
        }

    def observed(self, ctx: LayerContext) -> None:
        self._account(ctx.layer, ctx.adapter)  # after the step: the layer in the model dtype, as it is saved

    def replayed(self, ctx: LayerContext) -> None:
        self._account(ctx.layer, ctx.adapter)  # a finished layer of a resumed run counts as in the first run

    def _train(self, ctx: LayerContext, wrappers: dict) -> list[float]:
        params = list({id(w.smoothing): w.smoothing for w in wrappers.values() if isinstance(w.smoothing, nn.Parameter)}.values())
        if not params:
            return []
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        n = ctx.n_samples if self.train_samples is None else min(self.train_samples, ctx.n_samples)
        losses = []
        for _ in range(self.epochs):
            total = 0.0
            for j in range(n):  # one step per sample, in sample order (under torchrun: by the rank holding it)
                with torch.no_grad():
                    for p in params:
                        p.clamp_(min=self.scale_floor)  # keep s positive (reference: |s| ≥ 1e-2)
                opt.zero_grad(set_to_none=True)
                local, loss = ctx.local_index(j), None
                if local is not None:
                    with torch.enable_grad():
                        y = ctx.run(local)
                        loss = mbr_loss(y, ctx.fp_outputs[local].to(y.device),
                                        ctx.modality_ids[local].to(y.device), self.loss_weights)
                        loss.backward()
                total += ctx.world.share_gradients(params, loss, ctx.world.owner(j, ctx.n_samples))
                opt.step()
                self._project(params)
            losses.append(total / max(1, n))
        with torch.no_grad():
            for p in params:
                p.clamp_(min=self.scale_floor)
        return losses

    def _divergence_channels(self, layer, group) -> int | None:
        """How many input channels a non-text smoothing row may differ from the text row on
        (``None``: unconstrained).  ``"cmc"``: the CMC rank of the group's readers (the smallest)."""
        if self.divergence == "free":
            return None
        if isinstance(self.divergence, int):
            return self.divergence
        if self.cmc not in ("whitened", "plain", "split"):  # split: trained as CMC is, so the two compare
            return None
        shapes = [layer.get_submodule(p).weight.shape for p in group.readers]  # [out, in]
        return min(cmc_rank(self.rank, sh[1], sh[0], self.rank_floor) for sh in shapes)

    @torch.no_grad()
    def _project(self, params) -> None:
        for p in params:
            k = getattr(self, "_budgets", {}).get(id(p))
            if k is not None:
                p.clamp_(min=self.scale_floor)
                project_divergence(p.data, self.present, k)

    @torch.no_grad()
    def _deploy(self, original: nn.Module, trained: MASTrainLinear, st, whitenings: dict) -> MASLinear:
        scheme = self.scheme
        s = trained.smoothing.detach().double()  # [ROWS, in]
        w = original.weight.detach().double()
        in_f, out_f = w.shape[1], w.shape[0]
        present_other = [m for m in self.present if m != TEXT and m in st.count]
        rank = 0
        if self.cmc in ("whitened", "plain") and present_other:
            rank = cmc_rank(self.rank, in_f, out_f, self.rank_floor)
        dtype = original.weight.dtype
        q = MASLinear(in_f, out_f, original.bias is not None, scheme, ROWS, dtype=dtype, device=w.device, rank=rank,
                      split=self.cmc == "split")
        q.weight.data.copy_((w * s[TEXT]).to(dtype))
        if original.bias is not None:
            q.bias.data.copy_(original.bias.data)
        q.input_smoothing.copy_(s.float())
        if self.cmc != "split":
            q.pack()
        # ΔW_m against the weight that is stored (the packed codes and step sizes, dequantized), not a
        # re-quantization of W ⊙ s_T that could round differently (e.g. from a copy in the model's dtype)
        w_hat = q.quantized_weight().double()
        if self.cmc == "split":
            for m in range(ROWS):
                q.split_weight[m].copy_(fake_quantize_weight((w * s[m]).float(), scheme.wbits, scheme.group_size,
                                                             scheme.sym).to(dtype))
        for m in present_other if rank else []:
            target = w * s[m]
            if self.cmc_target == "quantized":
                target = fake_quantize_weight(target.float(), scheme.wbits, scheme.group_size, scheme.sym).double()
            moment = factor = None
            if self.cmc == "whitened":
                key = (id(st), id(trained.smoothing), m)  # readers of a group with one (tied) smoothing share it
                if key not in whitenings:
                    moment = st.moment[m].to(s.device) / s[m][:, None] / s[m][None, :]  # C_m of X̃_m = X_m / s_m (E11)
                    whitenings[key] = (moment, whitening(moment, self.damping))
                moment, factor = whitenings[key]
            left, right = whitened_low_rank(target - w_hat, moment, rank, self.damping, factor)
            if self.cmc_bits < 16:
                left = fake_quantize_weight(left.T.float(), self.cmc_bits).T.double()
                right = fake_quantize_weight(right.float(), self.cmc_bits).double()
            q.cmc_left[m].copy_(left.to(dtype))
            q.cmc_right[m].copy_(right.to(dtype))
        return q

    def _account(self, layer, adapter) -> None:
        """Exact memory and per-token FLOP overhead of the CMC branches (model dtype bytes)."""
        for path in adapter.linear_names():
            mod = layer.get_submodule(path)
            self.summary["linear_macs_per_token"] += mod.in_features * mod.out_features
            self.summary["weight_bytes"] += mod.in_features * mod.out_features * self.scheme.wbits / 8
            if isinstance(mod, MASLinear) and mod.rank:
                elem = mod.cmc_left.element_size()
                per_mod = mod.rank * (mod.in_features + mod.out_features)
                for m in self.present:
                    if m == TEXT:
                        continue
                    self.summary["cmc_bytes"] += per_mod * elem
                    key = MODALITY_NAMES[m]
                    self.summary["cmc_macs_per_token"][key] = self.summary["cmc_macs_per_token"].get(key, 0) + per_mod

    def finalize(self, model, adapter) -> None:
        s = self.summary
        if s.get("weight_bytes"):
            s["cmc_bytes_fraction"] = s["cmc_bytes"] / s["weight_bytes"]
        if s.get("linear_macs_per_token"):
            s["cmc_flops_per_token"] = {k: 2 * v for k, v in s["cmc_macs_per_token"].items()}
            s["cmc_flops_fraction"] = {k: v / s["linear_macs_per_token"] for k, v in s["cmc_macs_per_token"].items()}

    def method_summary(self) -> dict | None:
        return self.summary


def _group_of(adapter, path: str) -> str:
    for g in adapter.groups:
        if path in g.readers:
            return g.name
    raise KeyError(path)


@torch.no_grad()
def project_divergence(s: torch.Tensor, present: list[int], k: int) -> torch.Tensor:
    """Keep each non-text row ``s_m`` on its ``k`` channels of largest ``|log s_m − log s_T|`` and set
    it to ``s_T`` elsewhere (in place).

    Why: CMC corrects ``ΔW_m = W ⊙ s_m − Q(W ⊙ s_T)``, whose part ``W ⊙ (s_m − s_T)`` has rank equal
    to the number of channels where ``s_m ≠ s_T``.  Unconstrained MAS training moves ``s_m`` on every
    channel, so a rank-``r`` correction cannot represent it; with at most ``r`` differing channels it
    can, up to the weight-quantization residual.  (Our addition; the paper leaves ``s_m`` free.)"""
    if k >= s.shape[-1]:
        return s
    log_t = s[TEXT].clamp(min=1e-12).log()
    for m in present:
        if m == TEXT or m >= s.shape[0]:
            continue
        d = (s[m].clamp(min=1e-12).log() - log_t).abs()
        tie = torch.ones_like(d, dtype=torch.bool)
        if k > 0:
            tie[d.topk(k).indices] = False
        s[m, tie] = s[TEXT, tie]
    return s


def _divergence(s: torch.Tensor, present: list[int]) -> dict:
    """Mean |log s_m − log s_T| per non-text modality (0 = identical smoothing)."""
    out = {}
    log_s = s.double().clamp(min=1e-12).log()
    for m in present:
        if m != TEXT:
            out[MODALITY_NAMES[m]] = round(float((log_s[m] - log_s[TEXT]).abs().mean()), 4)
    return out


def mbr_loss(y: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, weights: dict[int, float]) -> torch.Tensor:
    """E9: modality-weighted sum of per-token L1 errors over ``L·d`` (an absent modality adds 0)."""
    rows = modality_rows(ids.reshape(y.shape[:-1]), ROWS)
    lam = torch.ones(rows.shape, dtype=y.dtype, device=y.device)
    for m, v in weights.items():
        lam = torch.where(rows == m, torch.full_like(lam, v), lam)
    per_token = (y.float() - target.float()).abs().sum(-1)
    return (per_token * lam).sum() / per_token.numel() / y.shape[-1]
