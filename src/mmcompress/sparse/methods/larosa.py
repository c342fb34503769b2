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
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from ... import options as opt
from .. import plan as plans
from ..linear import SparseLinear
from ..merge import (PrefillPolicySparseLinear, inner_layer, merge_layer, merge_outside, merge_rotations,
                     rotate_reference, rotate_reference_layer, supports_merged, untie_head)
from ...engine import Method, run_layerwise
from ..rotation import MODES, calibrate_rotations, norm_moment_observer, rotation_from_moment
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
    for i in range(len(adapter.layers)):
        apply_topk_layer(adapter, i, plan, prefill)


def plan_readers(adapter, i: int, plan: plans.SparsityPlan):
    """``(layer, path, module, k)`` for every reader of decoder layer ``i``, with the plan's K for its group."""
    layer = inner_layer(adapter.layers[i])
    for g in adapter.layer_groups(i):
        k = plan.keep(i, plans.GROUP_ACTIVATION[g.name])
        for path in g.readers:
            yield layer, path, layer.get_submodule(path), k


def apply_topk_layer(adapter, i: int, plan: plans.SparsityPlan, prefill: str = "all") -> None:
    """:func:`apply_topk_plan` for decoder layer ``i`` alone."""
    for layer, path, mod, k in plan_readers(adapter, i, plan):
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


@contextmanager
def readable_head(model, adapter):
    """The final norm and the head of a streamed model read from its checkpoint for the block (put back
    on the meta device after it; the merged mode's, already read and changed, stay as they are)."""
    stream = getattr(model, "_mmcompress_stream", None)
    mods = [adapter.final_norm, adapter.lm_head]
    saved = [(m, n, p) for m in mods for n, p in m._parameters.items() if p is not None and p.is_meta]
    if stream is not None and saved:
        for m in mods:
            stream.materialize(model, m)
    try:
        yield
    finally:
        for m, n, p in saved:
            m._parameters[n] = p


@torch.no_grad()
def head_nll(adapter, chain: plans.SearchChain, labels, world, start: int) -> float:
    """Mean next-token NLL of the samples whose last hidden states are ``chain.x`` (this rank's, global
    indices from ``start``; ``labels``: every rank's ``input_ids``): final norm, head (and the model's final
    logit soft-capping, if any), as the model's forward computes its logits; the per-sample sums are
    added in sample order over all ranks (:func:`calibration_nll`'s sum, bit for bit)."""
    sums = []
    cap = getattr(adapter.text_config, "final_logit_softcapping", None)
    head, norm = adapter.lm_head, adapter.final_norm
    for j, h in enumerate(chain.x):
        ids = labels[start + j]
        dev = head.weight.device
        logits = head(norm(h.to(dev)))
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:].to(dev), reduction="sum")
        sums.append(float(loss))
    if world.size > 1:
        sums = world.gather_rows(torch.tensor(sums, dtype=torch.float64), torch.arange(start, start + len(sums)),
                                 chain.total).tolist()
    nll, n = 0.0, 0
    for j, loss in enumerate(sums):
        nll += loss
        n += labels[j].shape[1] - 1
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

    def step(self, ctx) -> None:
        self.search(ctx, *plans.search_count(ctx, self.search_samples))

    @torch.no_grad()
    def search(self, ctx, n: int, total: int) -> None:
        """Pick this layer's levels on the first ``n`` samples of ``ctx.fp_inputs`` (``total`` over all ranks)
        against ``ctx.fp_outputs``, and leave them installed (the readers' ``keep``)."""
        layer, adapter = inner_layer(ctx.layer), ctx.adapter
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
                                        lambda: plans.layer_tail_error(ctx, n, self.tail, total), apply,
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
    if prefill != "all":  # the requested prefill policy (the search sparsified every token)
        for i in range(len(adapter.layers)):
            _set_prefill(adapter, i, prefill)
    return chosen


def _set_prefill(adapter, i: int, prefill: str) -> None:
    """Rebuild decoder layer ``i``'s readers with the prefill policy ``prefill``, keeping their selectors."""
    layer = inner_layer(adapter.layers[i])
    for g in adapter.layer_groups(i):
        for path in g.readers:
            mod = layer.get_submodule(path)
            layer.set_submodule(path, make_sparse_linear(mod, mod.selector, prefill))


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
    return grid_choice(results)


def grid_choice(results) -> plans.SparsityPlan:
    """The plan of the least finite loss in ``[(loss, ratio_in, plan), ...]`` (the first of equals), with
    every candidate's loss in its description."""
    loss, r, best = min(results, key=lambda t: (t[0] if math.isfinite(t[0]) else float("inf")))
    best.kind = "grid"
    best.info.update({"grid": {f"{rr:.2f}": round(ll, 5) for ll, rr, _ in results}, "calibration_nll": round(loss, 5)})
    return best


def _check(adapter, mode: str, prefill: str, column_scale: bool) -> None:
    if mode == "merged":
        ok, why = supports_merged(adapter)
        if not ok:
            raise NotImplementedError(f"merged mode is not supported for {adapter.family}: {why}")
    elif mode not in MODES:
        raise ValueError(f"mode must be 'merged' or 'reference', got {mode!r}")
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"prefill policy must be one of {PREFILL_POLICIES}, got {prefill!r}")
    if column_scale and mode != "merged":
        raise ValueError("column_scale applies to the merged mode only")


def larosa(model, adapter, samples, sparsity: float, *, plan: str = "exact", mode: str = "merged",
           prefill: str = "all", basis: str = "attn", ratio_in: float = 0.8, device="cpu", progress=True,
           grid_samples: int = 4, rotations=None, column_scale: bool = False) -> dict:
    """Apply LaRoSA in place, in stages over the whole model (rotation walk, merge, plan); returns a
    description (mode, plan, achieved model-level sparsity).  The ``grid`` plan runs whole-model forwards
    of the merged model, ``greedy`` a search walk over it.  Every plan runs in one walk as
    :class:`LaRoSALayers` with the same result (tests/test_sparse_search.py), one layer in memory (two in
    merged mode with ``basis="both"``); these stages remain for given ``rotations``.

    ``column_scale`` (merged mode only; ours): Top-K ranks rotated coordinates by |x̃_i|·‖W'_{:,i}‖
    (see :mod:`..merge`)."""
    _check(adapter, mode, prefill, column_scale)
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
    return _description(mode, basis, prefill, rotations.tokens, column_scale, chosen)


def _description(mode, basis, prefill, tokens, column_scale, chosen) -> dict:
    return {"method": "larosa", "mode": mode, "basis": basis, "prefill": prefill, "rotation_tokens": tokens,
            **({"column_scale": True} if column_scale else {}), **chosen.summary()}


class LaRoSALayers(Method):
    """LaRoSA as an engine method, one pass per layer: the observers accumulate ``H_l`` on the pass of
    the unchanged layer (the dense chain, as :func:`..rotation.calibrate_rotations`), then
    :meth:`observed` rotates the layer and installs its Top-K (``observe_then_change``).

    Mode M's residual adapter after layer ``l`` needs ``Q_{l+1}`` before layer ``l`` is written:
    ``H_{l+1} = Σ RMS(r)ᵀRMS(r)`` of the next layer's input ``r`` is this layer's output, so the same
    pass observes it (and layer ``l+1`` reuses it).  With ``basis="both"`` ``H_{l+1}`` also sums layer
    ``l+1``'s MLP input, which only layer ``l+1``'s own pass produces: layer ``l`` is kept in memory,
    unchanged and unwritten, until then (``lookahead``, :class:`~mmcompress.engine.Method`): the pass of
    layer ``l+1`` gives ``Q_{l+1}``, and :meth:`observed` finishes layer ``l`` (merge with ``Q_l`` and
    ``A_l = Q_lᵀQ_{l+1}``, its Top-K, the search chains through it) before the engine writes it; two
    layers in memory, not the model.  The first layer's inputs of the merged model
    are ``x Q_1`` (:meth:`first_inputs`); the embedding, the towers' output projections and the head are
    folded after the walk (:meth:`finalize`, :func:`..merge.merge_outside`).

    Plans, all in this one walk (:func:`larosa` runs the same searches in stages over the whole model,
    with the same result):

    * ``exact``, ``uniform``: K from the weights' shapes alone (:mod:`..plan`).
    * ``grid`` (the paper's Algorithm 1, our reconstruction): candidates ``exact`` at input-side ratios
      ``r ∈ GRID_RATIOS``; the first ``grid_samples`` samples go through the rotated layers once per
      candidate (``G`` side chains, :class:`..plan.SearchChain`), and after the last layer the head gives
      each its calibration NLL ``−(1/N) Σ_t log p(x_{t+1} | x_{≤t})``; the candidate with the least wins.
      A layer's tensors do not depend on K (K lives in its module spec), so the layers are written as
      they are done and K is set on the finished modules in :meth:`finalize`, before the specs are saved.
    * ``greedy`` (TEAL's block-wise greedy search over the four Top-K levels, :class:`TopKGreedy`): each
      layer's levels are chosen on the first samples' chain through the rotated dense layers (K = D)
      before the layer is written."""

    name = "larosa"
    observe_then_change = True
    distributed = True  # H_l, the token count, the grid's losses and the greedy errors are combined over the ranks

    def __init__(self, sparsity: float, *, plan: str = "exact", mode: str = "merged", prefill: str = "all",
                 basis: str = "attn", ratio_in: float = 0.8, column_scale: bool = False, damping: float = 0.01,
                 grid_samples: int = 4):
        if plan not in ("exact", "uniform", "grid", "greedy"):
            raise ValueError(f"unknown plan {plan!r}; choose exact, uniform, grid or greedy")
        if basis not in ("attn", "both"):
            raise ValueError(f"basis must be 'attn' or 'both', got {basis!r}")
        self.sparsity, self.plan_kind, self.mode, self.prefill = float(sparsity), plan, mode, prefill
        self.basis, self.ratio_in, self.column_scale, self.damping = basis, ratio_in, column_scale, damping
        self.grid_samples = int(grid_samples)
        self.chooses_at_end = plan == "grid"  # K is known after the last layer (see Method.chooses_at_end)
        self.lookahead = mode == "merged" and basis == "both"  # layer l is finished once Q_{l+1} is known

    def config(self) -> dict:
        return {"method": self.name, "sparsity": self.sparsity, "plan": self.plan_kind, "mode": self.mode,
                "prefill": self.prefill, "basis": self.basis, "ratio_in": self.ratio_in,
                "column_scale": self.column_scale, "grid_samples": self.grid_samples}

    def prepare(self, model, adapter, samples=None) -> None:
        _check(adapter, self.mode, self.prefill, self.column_scale)
        self.adapter = adapter
        self.shapes = plans.layer_shapes(adapter)
        self.plan = self.search = None
        self._chains: dict[float, plans.SearchChain] = {}
        if self.plan_kind == "grid":
            self._candidates = {r: plans.exact(self.shapes, self.sparsity, ratio_in=r) for r in plans.GRID_RATIOS
                               if r * self.sparsity < plans.MAX_LEVEL}
            self._chains = {r: plans.SearchChain(self.grid_samples) for r in self._candidates}
            self._labels = [s["input_ids"] for s in list(samples or ())[: self.grid_samples]]
        elif self.plan_kind == "greedy":
            self.search = TopKGreedy(self.sparsity)
            self._chains = {0: plans.SearchChain(self.search.search_samples)}
        else:
            self.plan = build_plan(self.plan_kind, self.shapes, self.sparsity, ratio_in=self.ratio_in)
        self.dtype = adapter.embed_tokens.weight.dtype
        self.q_first = self.q_last = None
        self._next = None  # H of the next layer's input (merged mode, basis attn)
        self._pending = None  # (context, Q) of the layer waiting for the next one's Q (lookahead)
        self.tokens = 0
        if self.mode == "merged":
            untie_head(model, adapter)

    def step(self, ctx) -> None:
        pass  # the layer changes in observed(), after the pass the observers watch

    def observers(self, ctx):
        i, n = ctx.index, len(self.adapter.layers)
        groups = {g.name: g for g in ctx.adapter.groups}
        d = self.adapter.text_config.hidden_size
        cur = self._cur = {"H": None, "next": None, "n": 0}
        out = []
        if self._next is None:  # this layer's H: the first layer, or reference mode
            cur["H"] = torch.zeros(d, d, dtype=torch.float64, device=ctx.device)
            for gname in ["attn_in"] + (["mlp_in"] if self.basis == "both" else []):
                norm = ctx.layer.get_submodule(groups[gname].producer)
                out.append(norm_moment_observer(norm, self.mode, cur, "H", count=gname == "attn_in"))
        if self.mode == "merged" and not self.lookahead and i + 1 < n:  # the next layer's H from this layer's output
            cur["next"] = torch.zeros(d, d, dtype=torch.float64, device=ctx.device)
            g = {g.name: g for g in self.adapter.at_layer(i + 1).groups}["attn_in"]
            norm = inner_layer(self.adapter.layers[i + 1]).get_submodule(g.producer)
            obs = norm_moment_observer(norm, "merged", cur, "next", count=cur["H"] is None)[2]
            out.append((ctx.layer, "output", lambda y, obs=obs: obs(y[0] if isinstance(y, tuple) else y)))
        return out

    def planned_state(self, i: int, n: int, state: dict) -> dict:
        """Merged mode: the last layer has no residual adapter (there is no ``Q_{L+1}``)."""
        if self.mode == "merged" and i == n - 1:
            return {k: v for k, v in state.items() if not k.startswith("residual_adapter.")}
        return state

    @property
    def replay_uses_layer(self) -> bool:
        return self.plan_kind in ("grid", "greedy")  # the search chains go on through the finished layer

    @torch.no_grad()
    def _seen(self, ctx):
        """What the observers saw of this layer's pass: the moments, the token count, ``Q_l`` (and, merged
        mode with ``basis="attn"``, ``Q_{l+1}`` from this layer's output); ``(q, q_next)``."""
        cur, self._cur = self._cur, None
        i, world = ctx.index, ctx.world
        h = world.sum(cur["H"]).cpu() if cur["H"] is not None else self._next
        if cur["n"]:
            self.tokens = world.sum(cur["n"])
        q, _ = rotation_from_moment(h, self.damping)
        q_next = None
        if self.mode == "merged" and not self.lookahead:
            self._next = world.sum(cur["next"]).cpu() if cur["next"] is not None else None
            q_next = None if self._next is None else rotation_from_moment(self._next, self.damping)[0]
        return q, q_next

    def _ends(self, ctx, q, q_next) -> None:
        """``Q_1`` and ``Q_L`` (merged mode: folded into the embedding and head), and the search's world and
        first sample (from the first layer)."""
        if self.mode == "merged":
            if ctx.index == 0:
                self.q_first = q
            if q_next is None:
                self.q_last = q
        if ctx.index == 0:
            self._world, self._start = ctx.world, (ctx.sample_ids.start if ctx.sample_ids is not None else 0)

    def _start_chains(self, ctx) -> None:
        if ctx.index == 0:  # the search chains start from the inputs of the rotated model
            for chain in self._chains.values():
                chain.start(ctx, self.first_inputs(ctx.inputs[: chain.wanted]))

    @torch.no_grad()
    def observed(self, ctx) -> None:
        q, q_next = self._seen(ctx)
        if self.lookahead:  # Q_i completes the held layer i-1; layer i waits for Q_{i+1} (the last one: none)
            pending, self._pending = self._pending, (ctx, q)
            if pending is not None:
                self._finish(*pending, q)
            if ctx.index + 1 == len(self.adapter.layers):
                self._pending = None
                self._finish(ctx, q, None)
            return
        self._finish(ctx, q, q_next)

    def _finish(self, ctx, q, q_next) -> None:
        """Rotate layer ``ctx.index`` with ``Q`` (merged: with the residual adapter to ``q_next``, none after
        the last layer), run the search chains through it and install its Top-K."""
        i = ctx.index
        self._ends(ctx, q, q_next)
        if self.mode == "merged":
            ctx.layer = merge_layer(ctx.adapter, i, q, q_next, column_scale=self.column_scale)
        else:
            rotate_reference_layer(ctx.adapter, i, q)
        self._start_chains(ctx)
        if self.plan_kind == "grid":
            for r, candidate in self._candidates.items():  # K = the last candidate's until finalize() picks
                apply_topk_layer(ctx.adapter, i, candidate, self.prefill)
                self._chains[r].advance(ctx, self._chains[r].outputs(ctx))
        elif self.plan_kind == "greedy":
            self._greedy(ctx)
        else:
            apply_topk_layer(ctx.adapter, i, self.plan, self.prefill)

    @torch.no_grad()
    def replayed(self, ctx) -> None:
        """Resume: the observers have watched the input layer's pass (moments, token count, ``Q_1``, ``Q_L``);
        the grid's chains go on through the finished layer at each candidate's K (the last one's stays, as
        in the walk), the greedy levels come back from the checkpoint (``ctx.state``) and its chain goes on
        through the finished layer at K = D."""
        i = ctx.index
        self._ends(ctx, *self._seen(ctx))
        self._start_chains(ctx)
        if self.plan_kind == "grid":
            for r, candidate in self._candidates.items():
                apply_topk_layer(ctx.adapter, i, candidate, self.prefill)
                self._chains[r].advance(ctx, self._chains[r].outputs(ctx))
        elif self.plan_kind == "greedy":
            self.search.levels.append(dict(ctx.state["levels"]))
            readers = [mod for _, _, mod, _ in plan_readers(ctx.adapter, i, plans.exact(self.shapes, 0.0))]
            keep = [mod.keep for mod in readers]
            apply_topk_layer(ctx.adapter, i, plans.exact(self.shapes, 0.0), "all")  # K = D, as the search's chain
            dense = self._chains[0].outputs(ctx)
            for mod, k in zip(readers, keep):
                mod.keep = k
            self._chains[0].advance(ctx, dense)

    def _greedy(self, ctx) -> None:
        """This layer's greedy levels on the chain through the rotated dense layers (as :func:`greedy_plan`)."""
        i, chain = ctx.index, self._chains[0]
        apply_topk_layer(ctx.adapter, i, plans.exact(self.shapes, 0.0), "all")  # K = D, every token
        dense = chain.outputs(ctx)
        self.search.search(replace(ctx, fp_inputs=chain.x, fp_outputs=dense), chain.here, chain.total)
        ctx.state["levels"] = self.search.levels[-1]  # for a resumed run (replayed)
        if self.prefill != "all":  # the requested prefill policy (the search sparsified every token)
            _set_prefill(ctx.adapter, i, self.prefill)
        chain.advance(ctx, dense)

    def first_inputs(self, inputs):
        if self.mode != "merged":
            return inputs
        return [(x.double() @ self.q_first).to(x.dtype) for x in inputs]

    def finalize(self, model, adapter) -> None:
        if self.mode == "merged":
            merge_outside(model, adapter, self.q_first, self.q_last)
        if self.plan_kind == "grid":
            self.plan = self._pick(model, adapter)
            for i in range(len(adapter.layers)):  # the finished layers' K (their modules' specs)
                for _, _, mod, k in plan_readers(adapter, i, self.plan):
                    mod.keep = k
        elif self.plan_kind == "greedy":
            self.plan = plans.per_projection(self.shapes, self.search.levels, "greedy", self.sparsity,
                                             greedy={"delta": round(self.search.delta, 6),
                                                     "search_samples": self.search.search_samples})
        self._chains = {}

    def _pick(self, model, adapter) -> plans.SparsityPlan:
        """The grid candidate with the least calibration NLL (as :func:`grid_search`: the first of equals)."""
        with readable_head(model, adapter):
            return grid_choice([(head_nll(adapter, self._chains[r], self._labels, self._world, self._start), r, c)
                                for r, c in self._candidates.items()])

    def description(self) -> dict:
        return _description(self.mode, self.basis, self.prefill, self.tokens, self.column_scale, self.plan)


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

    def layer_method(self) -> LaRoSALayers:
        return LaRoSALayers(self.sparsity, **self.kwargs())
