"""WINA: Weight-Informed Neuron Activation (Chen et al., ICLR 2026, arXiv 2505.19427), as a baseline.

TEAL keeps the input channels with the largest ``|x_i|``.  WINA scores a channel by what it can add to
the output, the activation times the ℓ2 norm of the weight column it multiplies::

    keep_i  ⇔  |x_i| · c_i  among the K largest,      c_i = ‖W_{:,i}‖₂                      (WINA §3)
    y = (x ⊙ m) Wᵀ                                                                         (the kept x, unscaled)

Its error bound is tight when the columns of W are orthogonal.  To get there WINA first folds the
RMSNorm scale γ into the readers and rotates each block input by the right singular vectors of one
of its readers (the published code: ``W_k diag(γ)`` for the attention input, ``W_gate diag(γ)`` for the
MLP input, SliceGPT-style computational invariance), so that reader's rotated weight ``U Σ`` has
orthogonal columns and ``c = σ``::

    W diag(γ) = U Σ Vᵀ,   Q = V,   x̃ = RMS(x) Q,   W' = W diag(γ) Q

Here the rotation runs at the block input (``RotatedNorm``, γ folded into the readers), which is the
same function as folding Q into the residual stream; o_proj and down_proj read unrotated inputs.
Every reader scores with its own column norms (the paper's criterion for every matrix; the published
code scores q, v, up, o and down by ``|x|`` alone).  Per token exactly K channels are kept
(``mask_by='topk'`` of the published evaluation).  Plans: ``uniform`` (every projection at the target)
or ``greedy`` (the block-wise greedy allocation of TEAL, which WINA uses, over the four activations
h1–h4 of a layer; the published code searches seven per-matrix levels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from ... import options as opt
from ...models.adapters import UnsupportedModelError, projection_name
from .. import plan as plans
from ..merge import block_input_norm, inner_layer, rotate_block_input, rotate_rows
from ...engine import Method, run_layerwise
from ...specs import register_sparse_module
from .base import SparseMethod, SparseOptions
from .larosa import TopKGreedy, plan_readers

ROTATION_SOURCES = {"attn_in": "k", "mlp_in": "gate"}  # the projection whose SVD gives Q (published code)


@register_sparse_module
class WinaLinear(nn.Module):
    """``y = (x ⊙ m) Wᵀ + b`` with ``m`` the K channels of largest ``|x_i|·c_i`` per token."""

    def __init__(self, in_features: int, out_features: int, bias: bool, keep: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.keep = in_features, out_features, int(keep)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.register_buffer("column_norm", torch.ones(in_features, dtype=torch.float32, device=device))
        self.sparse_prefill = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep: int) -> "WinaLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, keep,
                dtype=linear.weight.dtype, device=linear.weight.device)
        m.weight.data.copy_(linear.weight.data)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.data)
        m.column_norm.copy_(linear.weight.data.float().norm(dim=0))
        return m

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep >= self.in_features or (not self.sparse_prefill and x.dim() >= 2 and x.shape[-2] > 1):
            return x
        score = x.abs().float() * self.column_norm.to(x.device)
        idx = score.topk(self.keep, dim=-1).indices
        return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.sparsify(x), self.weight, self.bias)

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "keep": self.keep, "sparse_prefill": self.sparse_prefill,
                "dtype": str(self.weight.dtype).replace("torch.", "")}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "WinaLinear":
        m = cls(spec["in_features"], spec["out_features"], spec["bias"], spec["keep"],
                dtype=getattr(torch, spec["dtype"]), device=device)
        m.sparse_prefill = spec.get("sparse_prefill", True)
        return m

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, keep={self.keep}"


@torch.no_grad()
def orthogonalize_block_inputs(adapter) -> None:
    """Fold γ into the q/k/v and gate/up readers and rotate each block input by ``V`` of its source
    reader's SVD (``W diag(γ) = U Σ Vᵀ``).  Exact: the model's function does not change."""
    for i in range(len(adapter.layers)):
        orthogonalize_layer(adapter, i)


@torch.no_grad()
def orthogonalize_layer(adapter, i: int) -> None:
    """:func:`orthogonalize_block_inputs` for decoder layer ``i`` alone."""
    groups = {g.name: g for g in adapter.layer_groups(i)}
    d = adapter.text_config.hidden_size
    layer = inner_layer(adapter.layers[i])
    for gname, source in ROTATION_SOURCES.items():
        g = groups[gname]
        norm = block_input_norm(layer, g)
        gamma = adapter.norm_scale(norm)
        readers = g.modules(layer)
        src = next(m for p, m in zip(g.readers, readers) if projection_name(p) == source)
        q = torch.linalg.svd(src.weight.data.double() * gamma[None, :], full_matrices=True).Vh.T
        for lin in readers:
            rotate_rows(lin.weight.data, q, gamma)  # W diag(γ) Q
        adapter.set_norm_scale(norm, torch.ones_like(gamma))
        rotate_block_input(layer, g, q, d)


def apply_plan(adapter, plan: plans.SparsityPlan, prefill: str = "all") -> None:
    """Every reader becomes a :class:`WinaLinear` with the plan's K (or gets the new K in place)."""
    for i in range(len(adapter.layers)):
        apply_plan_layer(adapter, i, plan, prefill)


def apply_plan_layer(adapter, i: int, plan: plans.SparsityPlan, prefill: str = "all") -> None:
    """:func:`apply_plan` for decoder layer ``i`` alone."""
    for layer, path, mod, k in plan_readers(adapter, i, plan):
        if not isinstance(mod, WinaLinear):
            mod = WinaLinear.from_linear(mod, k)
            layer.set_submodule(path, mod)
        mod.keep = k
        mod.sparse_prefill = prefill == "all"


def _check(adapter, plan: str, prefill: str) -> None:
    if plan not in ("uniform", "greedy"):
        raise ValueError(f"WINA plans are uniform or greedy, got {plan!r}")
    if prefill not in ("all", "none"):
        raise ValueError(f"WINA prefill policy must be all or none, got {prefill!r}")
    for i in range(len(adapter.layers)):  # hybrid decoders: linear-attention layers have other projections
        groups = {g.name: g.readers for g in adapter.layer_groups(i)}
        for gname, source in ROTATION_SOURCES.items():
            if not any(projection_name(p) == source for p in groups[gname]):
                raise UnsupportedModelError(
                    f"WINA cannot sparsify {adapter.family}: decoder layer {i} ({', '.join(groups[gname])}) has no "
                    f"{source}_proj, whose SVD gives WINA's basis (linear-attention layers); LaRoSA, TEAL and CATS run on it")


def _uniform(shapes, sparsity: float) -> plans.SparsityPlan:
    chosen = plans.exact(shapes, sparsity, ratio_in=1.0)
    chosen.kind = "uniform"
    return chosen


class WinaLayers(Method):
    """WINA as an engine method, one layer at a time: each layer's step orthogonalises its block inputs
    and installs its Top-K.  The uniform plan needs the weights alone (``data_free``: a recipe keeps no
    chain for it).  The greedy plan (:class:`.larosa.TopKGreedy`) picks each layer's levels on the first
    ``search_samples`` samples' chain through the orthogonalised dense layers (K = D; a side chain of the
    walk, :class:`..plan.SearchChain`) before the layer is written, as :func:`wina` does over the whole
    orthogonalised model, with the same result.  A resumed greedy run rebuilds the chain and the levels
    from the finished layers (:meth:`replayed`)."""

    name = "wina"
    distributed = True  # the greedy errors are gathered over the ranks (plan.layer_tail_error)

    def __init__(self, sparsity: float, prefill: str = "all", transform: bool = True, plan: str = "uniform",
                 step: float = 0.02, search_samples: int = 4):
        self.sparsity, self.prefill, self.transform = float(sparsity), prefill, bool(transform)
        self.plan_kind, self.step_size, self.search_samples = plan, float(step), int(search_samples)
        self.data_free = plan == "uniform"

    def replayed(self, ctx) -> None:
        """Resume: the greedy levels of finished layer ``i`` are read back from its modules' K (``1 − K/D``, the
        achieved level the search stored), and the search chain goes on through the layer with K = D."""
        if self.plan_kind == "uniform":
            return
        i = ctx.index
        layer, levels = inner_layer(ctx.layer), {}
        for g in ctx.adapter.layer_groups(i):
            for path in g.readers:
                mod = layer.get_submodule(path)
                levels[projection_name(path)] = 1.0 - mod.keep / mod.in_features
        self.search.levels.append(levels)
        self.plan = self._chosen()
        if i == 0:
            self.chain.start(ctx, ctx.inputs)
        apply_plan_layer(ctx.adapter, i, plans.exact(self.shapes, 0.0), "all")  # K = D, every token
        dense = self.chain.outputs(ctx)
        apply_plan_layer(ctx.adapter, i, self.plan, self.prefill)
        self.chain.advance(ctx, dense)

    def config(self) -> dict:
        return {"method": self.name, "sparsity": self.sparsity, "prefill": self.prefill, "transform": self.transform,
                **({"plan": self.plan_kind, "step": self.step_size, "search_samples": self.search_samples}
                   if self.plan_kind != "uniform" else {})}

    def prepare(self, model, adapter, samples=None) -> None:
        _check(adapter, self.plan_kind, self.prefill)
        self.shapes = plans.layer_shapes(adapter)
        if self.plan_kind == "uniform":
            self.plan = _uniform(self.shapes, self.sparsity)
        else:
            self.search = TopKGreedy(self.sparsity, step=self.step_size, search_samples=self.search_samples)
            self.chain = plans.SearchChain(self.search_samples)

    def step(self, ctx) -> None:
        i = ctx.index
        if self.transform:
            orthogonalize_layer(ctx.adapter, i)
        if self.plan_kind == "uniform":
            apply_plan_layer(ctx.adapter, i, self.plan, self.prefill)
            return
        apply_plan_layer(ctx.adapter, i, plans.exact(self.shapes, 0.0), "all")  # K = D, every token
        if i == 0:
            self.chain.start(ctx, ctx.inputs)
        dense = self.chain.outputs(ctx)
        self.search.search(replace(ctx, fp_inputs=self.chain.x, fp_outputs=dense), self.chain.here, self.chain.total)
        self.plan = self._chosen()
        apply_plan_layer(ctx.adapter, i, self.plan, self.prefill)
        self.chain.advance(ctx, dense)

    def _chosen(self) -> plans.SparsityPlan:
        """The greedy levels chosen so far (layers not reached yet: level 0)."""
        levels = self.search.levels + [{}] * (len(self.shapes) - len(self.search.levels))
        return plans.per_projection(self.shapes, levels, "greedy", self.sparsity,
                                    greedy={"delta": round(self.search.delta, 6), "search_samples": self.search_samples})

    def finalize(self, model, adapter) -> None:
        if self.plan_kind != "uniform":
            self.chain = None

    def description(self) -> dict:
        return {"method": "wina", "transform": self.transform, "prefill": self.prefill, **self.plan.summary()}


def wina(model, adapter, samples, sparsity: float, *, plan: str = "uniform", prefill: str = "all",
         transform: bool = True, device="cpu", progress=True, step: float = 0.02, search_samples: int = 4) -> dict:
    """Apply WINA in place over the whole model (the greedy plan's search walk runs on the orthogonalised
    model); returns a description (plan, achieved model-level sparsity).  Both plans run layer by layer as
    :class:`WinaLayers` (what :class:`WINA` uses), with the same result (tests/test_sparse_search.py)."""
    _check(adapter, plan, prefill)
    if transform:
        orthogonalize_block_inputs(adapter)
    shapes = plans.layer_shapes(adapter)
    if plan == "uniform":
        chosen = _uniform(shapes, sparsity)
    else:
        apply_plan(adapter, plans.exact(shapes, 0.0), "all")
        search = TopKGreedy(sparsity, step=step, search_samples=search_samples)
        run_layerwise(model, adapter, search, samples, device=device, progress=progress)
        chosen = plans.per_projection(shapes, search.levels, "greedy", sparsity,
                                      greedy={"delta": round(search.delta, 6), "search_samples": search_samples})
    apply_plan(adapter, chosen, prefill)
    return {"method": "wina", "transform": bool(transform), "prefill": prefill, **chosen.summary()}


@dataclass(frozen=True)
class WINAOptions(SparseOptions):
    plan: str = opt.option("uniform", opt.choice("uniform", "greedy"),
                           "uniform or greedy (over the four activations of each layer)")
    prefill: str = opt.override(SparseOptions, "prefill", check=opt.choice("all", "none"))
    transform: bool = opt.option(True, opt.boolean, "orthogonalise the block inputs first (the paper's tensor "
                                                    "transformation)")
    step: float = opt.option(0.02, opt.real(0, 0.5, lo_open=True), "plan greedy: level step of a move")
    search_samples: int = opt.option(4, opt.integer(1), "plan greedy: calibration samples of the search")


class WINA(SparseMethod):
    """WINA (see the module docstring): weight-informed Top-K after orthogonalising the block inputs."""

    name = "wina"
    rotating = True
    Options = WINAOptions

    def layer_method(self) -> WinaLayers:
        o = self.options
        return WinaLayers(self.sparsity, prefill=o.prefill, transform=o.transform, plan=o.plan, step=o.step,
                          search_samples=o.search_samples)
