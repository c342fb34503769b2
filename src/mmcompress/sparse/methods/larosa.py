"""LaRoSA: layer-wise rotated Top-K activation sparsity (Liu et al., ICML 2025; docs/methods.md).

1. Calibrate one PCA basis ``Q_l`` per decoder layer (:mod:`..rotation`), dense model chain.
2. Mode M (``mode="merged"``, default, deployable): fold γ and merge Q into readers, writers,
   embedding and head, residual adapters ``Q_lᵀQ_{l+1}`` between layers (:func:`..merge.merge_rotations`).
   Mode R (``mode="reference"``): ``(γ⊙RMS(r))·Q_l`` at run time, readers ``W Q_l``.
3. Per token Top-K on the (rotated) inputs of q,k,v (h1) and gate,up (h3), magnitude Top-K on the
   inputs of o (h2) and down (h4), with K from a :class:`..plan.SparsityPlan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ... import options as opt
from .. import plan as plans
from ..linear import SparseLinear
from ..merge import PrefillPolicySparseLinear, inner_layer, merge_rotations, rotate_reference, supports_merged
from ...engine import Method, run_layerwise
from ..rotation import calibrate_rotations
from ..topk import Selector, TopK, keep_count
from .base import SparseMethod, SparseOptions

PREFILL_POLICIES = ("all", "none", "last_half")


def make_sparse_linear(linear: nn.Module, selector: Selector | int, prefill: str = "all", **kw) -> SparseLinear:
    """A ``SparseLinear`` for ``linear`` keeping what ``selector`` keeps (``TopK(k)``, ``Threshold(t)``; an
    int is ``TopK(k)``) with the given prefill policy (``all`` | ``none`` | ``last_half``)."""
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"prefill policy must be one of {PREFILL_POLICIES}, got {prefill!r}")
    if isinstance(linear, SparseLinear):
        lin = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        dtype=linear.weight.dtype, device=linear.weight.device)
        lin.weight.data, lin.bias = linear.weight.data, linear.bias
        linear = lin
    if prefill == "last_half":
        m = PrefillPolicySparseLinear.from_linear(linear, selector, sparse_fraction=0.5, **kw)
    else:
        m = SparseLinear.from_linear(linear, selector, **kw)
        m.sparse_prefill = prefill == "all"
    return m


def apply_topk_plan(model, adapter, plan: plans.SparsityPlan, prefill: str = "all") -> None:
    """Replace every reader by a Top-K ``SparseLinear`` with the plan's K (or update K in place)."""
    for i, layer in enumerate(adapter.layers):
        layer = inner_layer(layer)
        for g in adapter.layer_groups(i):
            act = plans.GROUP_ACTIVATION[g.name]
            k = plan.keep(i, act)
            for path in g.readers:
                mod = layer.get_submodule(path)
                if isinstance(mod, SparseLinear) and mod.mode == "topk":
                    mod.keep = k
                else:
                    layer.set_submodule(path, make_sparse_linear(mod, TopK(k), prefill))


@torch.no_grad()
def calibration_nll(model, samples, max_samples: int = 4) -> float:
    """Mean next-token NLL of ``model`` on the first calibration samples (for the grid plan)."""
    nll, n = 0.0, 0
    for s in list(samples)[:max_samples]:
        ids = s["input_ids"]
        logits = model(**s, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:].to(logits.device), reduction="sum")
        nll += float(loss)
        n += ids.shape[1] - 1
    return nll / max(n, 1)


def build_plan(kind: str, shapes, sparsity: float, *, ratio_in: float = 0.8):
    if kind == "uniform":
        return plans.uniform(shapes, sparsity)
    if kind == "exact":
        return plans.exact(shapes, sparsity, ratio_in=ratio_in)
    raise ValueError(f"unknown plan {kind!r}; choose exact, uniform, grid or greedy")


class TopKGreedy(Method):
    """TEAL's block-wise greedy allocation applied to LaRoSA's Top-K (our extension): per layer the
    knobs are the four rotated activations h1 (q,k,v), h2 (o), h3 (gate,up), h4 (down), each move
    raises one ``K`` so the layer's parameter-weighted sparsity grows by about ``δ``, keeping the move
    with the least layer-output error on the last 25 % of the tokens (:func:`plan.greedy_levels`)."""

    name = "larosa-greedy"
    needs_fp_chain = True

    def __init__(self, sparsity: float, step: float = 0.02, tail: float = 0.25, search_samples: int = 4):
        self.sparsity, self.tail, self.search_samples = float(sparsity), float(tail), int(search_samples)
        _, self.delta = plans.greedy_moves(self.sparsity, step)
        self.levels: list[dict[str, float]] = []

    @torch.no_grad()
    def step(self, ctx) -> None:
        layer, adapter = inner_layer(ctx.layer), ctx.adapter
        n = min(self.search_samples, len(ctx.fp_inputs))
        readers, masses, dims, act_of = {}, {}, {}, {}
        for g in adapter.groups:
            act = plans.GROUP_ACTIVATION[g.name]
            act_of.update({plans.projection_name(p): act for p in g.readers})
            readers[act] = [layer.get_submodule(p) for p in g.readers]
            masses[act] = sum(m.weight.shape[0] * m.weight.shape[1] for m in readers[act])
            dims[act] = readers[act][0].in_features

        def apply(levels):
            for act, lv in levels.items():
                k = keep_count(dims[act], lv)
                for m in readers[act]:
                    m.keep = k

        levels, _ = plans.greedy_levels(masses, self.sparsity, self.delta,
                                        lambda: plans.layer_tail_error(ctx, n, self.tail), apply,
                                        snap=lambda act, lv: plans.achieved_level(dims[act], lv))
        self.levels.append({p: levels[act] for p, act in act_of.items()})
        ctx.info["larosa_greedy"] = {a: round(v, 4) for a, v in levels.items()}


def greedy_plan(model, adapter, shapes, sparsity: float, samples, prefill: str = "all", *, device="cpu",
                progress=True, step: float = 0.02, search_samples: int = 4) -> plans.SparsityPlan:
    """Search per-layer Top-K levels with :class:`TopKGreedy` on the (rotated) model and apply them."""
    apply_topk_plan(model, adapter, plans.exact(shapes, 0.0), "all")  # K = D everywhere, all tokens
    method = TopKGreedy(sparsity, step=step, search_samples=search_samples)
    run_layerwise(model, adapter, method, samples, device=device, progress=progress)
    chosen = plans.per_projection(shapes, method.levels, "greedy", sparsity,
                                  greedy={"delta": round(method.delta, 6), "search_samples": search_samples})
    for i, layer in enumerate(adapter.layers):  # the requested prefill policy (the search sparsified every token)
        layer = inner_layer(layer)
        for g in adapter.layer_groups(i):
            for path in g.readers:
                mod = layer.get_submodule(path)
                if prefill != "all":
                    layer.set_submodule(path, make_sparse_linear(mod, mod.selector, prefill))
    return chosen


def grid_search(model, adapter, shapes, sparsity: float, samples, prefill: str = "all", ratios=plans.GRID_RATIOS,
                max_samples: int = 4, log=None):
    """Our reconstruction of the paper's Algorithm 1: ``exact`` plans over a grid of input-side
    ratios (shared by attention and MLP blocks); the one with the lowest calibration NLL wins."""
    results = []
    for r in ratios:
        if r * sparsity >= plans.MAX_LEVEL:
            continue
        p = plans.exact(shapes, sparsity, ratio_in=r)
        apply_topk_plan(model, adapter, p, prefill)
        loss = calibration_nll(model, samples, max_samples)
        results.append((loss, r, p))
        if log:
            log(f"grid ratio_in={r:.2f}: calibration nll {loss:.4f}")
    loss, r, best = min(results, key=lambda t: (t[0] if math.isfinite(t[0]) else float("inf")))
    best.kind = "grid"
    best.info.update({"grid": {f"{rr:.2f}": round(ll, 5) for ll, rr, _ in results}, "calibration_nll": round(loss, 5)})
    return best


def larosa(model, adapter, samples, sparsity: float, *, plan: str = "exact", mode: str = "merged",
           prefill: str = "all", basis: str = "attn", ratio_in: float = 0.8, device="cpu", progress=True,
           grid_samples: int = 4, rotations=None, column_scale: bool = False) -> dict:
    """Apply LaRoSA in place; returns a description (mode, plan, achieved model-level sparsity).

    ``column_scale`` (merged mode only; ours): Top-K ranks rotated coordinates by |x̃_i|·‖W'_{:,i}‖
    (see :mod:`..merge`)."""
    if mode == "merged":
        ok, why = supports_merged(adapter)
        if not ok:
            raise NotImplementedError(f"merged mode is not supported for {adapter.family}: {why}")
    elif mode != "reference":
        raise ValueError(f"mode must be 'merged' or 'reference', got {mode!r}")
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"prefill policy must be one of {PREFILL_POLICIES}, got {prefill!r}")
    if column_scale and mode != "merged":
        raise ValueError("column_scale applies to the merged mode only")
    shapes = plans.layer_shapes(adapter)
    if plan not in ("grid", "greedy"):
        build_plan(plan, shapes, sparsity, ratio_in=ratio_in)  # validate before the calibration
    if rotations is None:
        rotations = calibrate_rotations(model, adapter, samples, mode=mode, basis=basis, device=device,
                                        progress=progress)
    elif rotations.mode != mode:
        raise ValueError(f"rotations were calibrated for mode {rotations.mode!r}, not {mode!r}")
    if mode == "merged":
        merge_rotations(model, adapter, rotations, column_scale=column_scale)
    else:
        rotate_reference(model, adapter, rotations)
    if plan == "grid":
        chosen = grid_search(model, adapter, shapes, sparsity, samples, prefill, max_samples=grid_samples)
        apply_topk_plan(model, adapter, chosen, prefill)
    elif plan == "greedy":
        chosen = greedy_plan(model, adapter, shapes, sparsity, samples, prefill, device=device, progress=progress)
    else:
        chosen = build_plan(plan, shapes, sparsity, ratio_in=ratio_in)
        apply_topk_plan(model, adapter, chosen, prefill)
    return {"method": "larosa", "mode": mode, "basis": basis, "prefill": prefill, "rotation_tokens": rotations.tokens,
            **({"column_scale": True} if column_scale else {}), **chosen.summary()}


@dataclass(frozen=True)
class LaRoSAOptions(SparseOptions):
    plan: str = opt.option("exact", opt.choice("exact", "uniform", "grid", "greedy"),
                           "exact (exact model-level sparsity), uniform (the reference's 0.8/1.2 split of a nominal "
                           "level), grid (input/output split searched on calibration loss), greedy (TEAL's block-wise "
                           "greedy search over the four Top-K levels of each layer)")
    mode: str = opt.option("merged", opt.choice("merged", "reference"),
                           "merged (Mode M: γ folded, rotations merged, residual adapters) or reference (Mode R: "
                           "(γ⊙RMS(r))·Q at run time, as the published code)")
    basis: str = opt.option("attn", opt.choice("attn", "both"),
                            "fit Q_l to the attention input (reference) or to attention + MLP inputs")
    ratio_in: float = opt.option(0.8, opt.real(0, 1), "plan uniform: input-side share of the nominal level")
    grid_samples: int = opt.option(4, opt.integer(1), "plan grid: calibration samples of the split search")
    column_scale: bool = opt.option(False, opt.boolean,
                                    "merged mode (ours): Top-K ranks each rotated coordinate by |x̃_i| times the norm "
                                    "of the readers' weight column it multiplies (folded into the norm scale; exact)")


class LaRoSA(SparseMethod):
    """LaRoSA (see the module docstring): rotation calibration, merge or reference rotation, Top-K plan."""

    name = "larosa"
    rotating = True
    Options = LaRoSAOptions

    def apply(self, model, adapter, samples, *, device="cpu", progress=True) -> dict:
        return larosa(model, adapter, samples, self.sparsity, device=device, progress=progress, **self.kwargs())
