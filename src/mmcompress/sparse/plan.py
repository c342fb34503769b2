"""Sparsity plans and model-level accounting (docs/methods.md).

A plan gives, for every decoder layer, the sparsity of the input of each projection
``q, k, v, o, gate, up, down`` (a layer of another kind has its own projections in the same four
activations, e.g. Qwen3.5's linear-attention layers ``in_proj_qkv, in_proj_z, in_proj_b, in_proj_a``
(h1) and ``out`` (h2); :attr:`LayerShape.readers`).  For Top-K (LaRoSA) projections that share an input share its level:
``h1`` (q,k,v), ``h2`` (o), ``h3`` (gate,up), ``h4`` (down); the level is realised as an integer
``K = round((1 − s)·D)`` and the plan stores the *achieved* level ``1 − K/D``.

Model-level sparsity (the paper's definition, embedding and head excluded)::

    S_model = Σ_m s_m·|W_m| / Σ_m |W_m|,   m over q, k, v, o, gate, up, down of every layer.

Constructors: ``uniform`` (the reference code's 0.8 / 1.2 split of a nominal level: the achieved
S_model is *below* the nominal one), ``exact`` (input side at ``ratio_in·p``, output side solved per
block so each block, hence the model, has parameter-weighted sparsity p up to integer rounding),
and ``grid`` candidates (``exact`` over a grid of ``ratio_in``; the caller picks the best on
calibration loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..models.adapters import projection_name  # the adapter's names of the readers (plans.projection_name)
from .merge import inner_layer
from .topk import check_level, keep_count

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ACTIVATION_OF = {"q": "h1", "k": "h1", "v": "h1", "o": "h2", "gate": "h3", "up": "h3", "down": "h4"}
READERS_OF = {"h1": ("q", "k", "v"), "h2": ("o",), "h3": ("gate", "up"), "h4": ("down",)}
GROUP_ACTIVATION = {"attn_in": "h1", "attn_out": "h2", "mlp_in": "h3", "mlp_out": "h4"}
MAX_LEVEL = 0.99
GRID_RATIOS = (0.5, 0.65, 0.8, 0.9, 1.0, 1.1)


@dataclass
class LayerShape:
    masses: dict[str, int]  # projection -> number of weights
    dims: dict[str, int]  # activation h1..h4 -> width D
    readers: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(READERS_OF))  # activation -> projections

    @property
    def total(self) -> int:
        return sum(self.masses.values())

    def mass_of(self, act: str) -> int:
        return sum(self.masses[p] for p in self.readers[act])


def layer_shapes(adapter) -> list[LayerShape]:
    """Masses and activation widths per decoder layer, read from the weights."""
    shapes = []
    for i, layer in enumerate(adapter.layers):
        layer = inner_layer(layer)
        masses, dims, readers = {}, {}, {}
        for g in adapter.layer_groups(i):
            act = GROUP_ACTIVATION[g.name]
            readers[act] = tuple(projection_name(path) for path in g.readers)
            for path in g.readers:
                w = layer.get_submodule(path).weight
                masses[projection_name(path)] = w.shape[0] * w.shape[1]
                dims[act] = w.shape[1]
        missing = set(PROJECTIONS) - set(masses)
        if readers.get("h1") == READERS_OF["h1"] and missing:  # a standard attention layer must be complete
            raise ValueError(f"decoder layer has no projections {sorted(missing)}")
        shapes.append(LayerShape(masses, dims, readers))
    return shapes


@dataclass
class SparsityPlan:
    """Per-layer input sparsity of every projection (see module docstring)."""

    levels: list[dict[str, float]]  # [layer][projection] -> sparsity of its input
    shapes: list[LayerShape]
    kind: str = "exact"
    target: float = 0.0
    info: dict = field(default_factory=dict)

    def level(self, layer: int, act: str) -> float:
        return self.levels[layer][self.shapes[layer].readers[act][0]]

    def keep(self, layer: int, act: str) -> int:
        """Top-K ``K`` of activation ``act`` in ``layer``."""
        return keep_count(self.shapes[layer].dims[act], self.level(layer, act))

    def model_sparsity(self) -> float:
        num = sum(lv[p] * sh.masses[p] for lv, sh in zip(self.levels, self.shapes) for p in sh.masses)
        den = sum(sh.total for sh in self.shapes)
        return num / den

    def summary(self) -> dict:
        acts = {a: [round(self.level(i, a), 6) for i in range(len(self.levels))] for a in READERS_OF}
        return {"plan": self.kind, "target": self.target, "model_sparsity": round(self.model_sparsity(), 6),
                "levels": acts, **self.info}


def achieved_level(dim: int, s: float) -> float:
    if s <= 0:
        return 0.0
    return 1.0 - keep_count(dim, min(s, MAX_LEVEL)) / dim


def _topk_levels(shape: LayerShape, s_by_act: dict[str, float]) -> dict[str, float]:
    out = {}
    for act, s in s_by_act.items():
        a = achieved_level(shape.dims[act], s)
        for p in shape.readers[act]:
            out[p] = a
    return out


def uniform(shapes: list[LayerShape], sparsity: float, ratio_in: float = 0.8, ratio_out: float = 1.2) -> SparsityPlan:
    """The reference code's plan: h1, h3 at ``0.8·s`` and h2, h4 at ``1.2·s`` in every layer."""
    if check_level(sparsity) * ratio_out >= 1:
        raise ValueError(f"uniform plan needs {ratio_out}·s < 1 (the reference crashes for s ≥ 0.834); got s={sparsity}")
    levels = [_topk_levels(sh, {"h1": ratio_in * sparsity, "h3": ratio_in * sparsity,
                                "h2": ratio_out * sparsity, "h4": ratio_out * sparsity}) for sh in shapes]
    return SparsityPlan(levels, shapes, kind="uniform", target=sparsity,
                        info={"nominal": sparsity, "ratio_in": ratio_in, "ratio_out": ratio_out})


def _solve_block(p: float, in_mass: int, out_mass: int, d_in: int, d_out: int, ratio_in: float) -> tuple[float, float]:
    """Achieved (s_in, s_out) with ``s_in ≈ ratio_in·p`` and parameter-weighted block sparsity ≈ p."""
    total = in_mass + out_mass
    s_in = achieved_level(d_in, min(max(ratio_in * p, 0.0), MAX_LEVEL))
    s_out = (p * total - s_in * in_mass) / out_mass
    if s_out > MAX_LEVEL or s_out < 0:  # the output side cannot absorb it: move the rest to the input side
        s_out = min(max(s_out, 0.0), MAX_LEVEL)
        s_out = achieved_level(d_out, s_out)
        s_in = achieved_level(d_in, min(max((p * total - s_out * out_mass) / in_mass, 0.0), MAX_LEVEL))
        return s_in, s_out
    # pick the integer K_out closest to the exact solution
    cands = {keep_count(d_out, min(s_out, MAX_LEVEL))}
    k = keep_count(d_out, min(s_out, MAX_LEVEL))
    cands.update({max(1, k - 1), min(d_out, k + 1)})
    best = min(cands, key=lambda kk: abs(s_in * in_mass + (1 - kk / d_out) * out_mass - p * total))
    return s_in, (1.0 - best / d_out) if p > 0 else 0.0


def exact(shapes: list[LayerShape], sparsity: float, ratio_in: float = 0.8) -> SparsityPlan:
    """Exact model-level sparsity ``p``: inputs (h1, h3) at ``ratio_in·p``, outputs (h2, h4) solved
    per block (attention, MLP) so that each block's parameter-weighted sparsity is p."""
    check_level(sparsity)
    levels = []
    for sh in shapes:
        s1, s2 = _solve_block(sparsity, sh.mass_of("h1"), sh.mass_of("h2"), sh.dims["h1"], sh.dims["h2"], ratio_in)
        s3, s4 = _solve_block(sparsity, sh.mass_of("h3"), sh.mass_of("h4"), sh.dims["h3"], sh.dims["h4"], ratio_in)
        lv = {}
        for act, s in (("h1", s1), ("h2", s2), ("h3", s3), ("h4", s4)):
            for p in sh.readers[act]:
                lv[p] = s
        levels.append(lv)
    return SparsityPlan(levels, shapes, kind="exact", target=sparsity, info={"ratio_in": ratio_in})


def per_projection(shapes: list[LayerShape], levels: list[dict[str, float]], kind: str, target: float, **info) -> SparsityPlan:
    """A plan from explicit per-projection levels (TEAL, CATS)."""
    full = [{p: float(lv.get(p, 0.0)) for p in sh.masses} for lv, sh in zip(levels, shapes)]
    return SparsityPlan(full, shapes, kind=kind, target=target, info=info)


def greedy_moves(target: float, step: float) -> tuple[int, float]:
    """``(moves, δ)`` of a greedy search to ``target``: ``δ = target / ⌈target / step⌉`` (0 moves at 0)."""
    if target <= 0:
        return 0, 0.0
    moves = max(1, math.ceil(target / step - 1e-9))
    return moves, target / moves


def greedy_levels(masses: dict[str, int], target: float, delta: float, error, apply, snap=None,
                  cap: float = MAX_LEVEL) -> tuple[dict[str, float], float | None]:
    """TEAL's block-wise greedy allocation for one layer, over any set of knobs (TEAL's ``greedyopt.py``).

    From all levels 0, each move tries raising one knob ``j`` by ``δ·M/M_j`` (``M_j`` its weight count,
    ``M`` the layer's, so every move adds about ``δ`` to the parameter-weighted sparsity), calls
    ``apply(levels)`` and ``error()``, and keeps the move with the least error; it stops once
    ``Σ_j s_j M_j / M ≥ target``.  ``snap(knob, level)`` maps a level to an achievable one (Top-K:
    ``1 − K/D``).  Returns the levels (applied) and the last error."""
    snap = snap or (lambda knob, lv: lv)
    total = sum(masses.values())
    levels = {j: 0.0 for j in masses}
    last = None

    def effective(lv):
        return sum(lv[j] * masses[j] for j in lv) / total

    while effective(levels) < target - 1e-9:
        best = None
        for j in masses:
            raw = levels[j] + delta * total / masses[j]
            if raw > cap:  # a knob that would pass the cap is out (moves stay exactly δ)
                continue
            new = snap(j, raw)
            if new <= levels[j] + 1e-12:
                continue
            trial = dict(levels, **{j: new})
            apply(trial)
            e = error()
            if best is None or e < best[0]:
                best = (e, j, new)
        if best is None:  # every knob at the cap
            break
        levels[best[1]] = best[2]
        last = best[0]
    apply(levels)
    return levels, last


def layer_tail_error(ctx, n: int, tail: float, total: int | None = None) -> float:
    """``Σ_j ‖Y_j − Y_j^dense‖²`` over the last ``tail`` fraction of each sample's tokens, the layer run
    on its dense inputs (TEAL's greedy objective, without its norm over the sequence axis); ``j`` over
    the first ``n`` samples of ``ctx.fp_inputs``.  Under ``torchrun`` (``total``: the search samples of all
    ranks, this rank's ``n`` the first of its block) the per-sample terms are gathered and added in the
    order of the samples, so every rank gets the one-process sum, bit for bit."""
    errs = []
    for j in range(n):
        y = ctx.run(j, ctx.fp_inputs[j]).float()
        ref = ctx.fp_outputs[j].to(y.device).float()
        keep = max(1, int(round(tail * y.shape[-2])))
        errs.append((y[..., -keep:, :] - ref[..., -keep:, :]).pow(2).sum().item())
    if ctx.world.size > 1:
        start = ctx.sample_ids.start if ctx.sample_ids is not None else 0
        errs = ctx.world.gather_rows(torch.tensor(errs, dtype=torch.float64),
                                     torch.arange(start, start + n), total).tolist()
    err = 0.0
    for e in errs:
        err += e
    return err


def search_count(ctx, wanted: int) -> tuple[int, int]:
    """``(here, total)``: of the first ``wanted`` calibration samples (a search's, over all ranks), how
    many this rank holds (the first ``here`` of its block) and how many there are in all."""
    total = min(wanted, ctx.n_samples)
    ids = ctx.sample_ids if ctx.sample_ids is not None else range(len(ctx.inputs))
    return max(0, min(total, ids.stop) - ids.start), total


class SearchChain:
    """The first calibration samples (a plan search's, ``wanted`` over all ranks; this rank's share) carried
    through the layers as the method leaves them before the search picks their levels: a side chain of
    the walk, so a search over the transformed model (rotated, orthogonalised) runs in the same one walk
    as the transform.  ``x``: this layer's inputs; :meth:`outputs` runs them through ``ctx.layer`` as it is
    now; :meth:`advance` makes outputs the next layer's inputs."""

    def __init__(self, wanted: int):
        self.wanted, self.x, self.here, self.total = int(wanted), None, 0, 0

    def start(self, ctx, inputs) -> None:
        """At the first layer: ``inputs`` are this rank's first-layer inputs (as the transformed model gets them)."""
        self.here, self.total = search_count(ctx, self.wanted)
        self.x = list(inputs[: self.here])

    @torch.no_grad()
    def outputs(self, ctx) -> list[torch.Tensor]:
        return [ctx.run(j, x).to("cpu") for j, x in enumerate(self.x)]

    def advance(self, ctx, outputs) -> None:
        self.x = [ctx.captured.after_layer(j, ctx.index, o) for j, o in enumerate(outputs)]
