"""TEAL: training-free magnitude activation sparsity (Liu et al., ICLR 2025; docs/methods.md).

For each projection input, ``s_t(x)_i = x_i·1[|x_i| ≥ t]`` with a threshold ``t`` fixed offline so
that a fraction ``p`` of the calibration activations fall below it.  Calibration streams the dense
model chain one layer at a time and keeps a seeded random sample of ``|x|`` per activation (h1: q,k,v
input; h2: o input; h3: gate,up input; h4: down input); the threshold for level ``p`` is its
empirical ``p``-quantile (equivalent to TEAL's ``icdf(0.5 + p/2)`` for a symmetric distribution,
without the symmetry assumption).  Prefill policies: ``all`` (LaRoSA's evaluation protocol),
``last_half`` (TEAL's own), ``none`` (dense prefill).

Allocation (``plan``):

* ``uniform``: every projection at ``p`` (the model-level sparsity is p in expectation; realised
  sparsity fluctuates per token);
* ``greedy``: TEAL's block-wise greedy optimisation (its ``greedyopt.py``).  Per
  layer, from all levels ``s_j = 0`` (``j`` over q, k, v, o, gate, up, down), each move tries raising
  one ``s_j`` by ``δ·M/M_j`` (``M_j`` its weight count, ``M`` the layer's: every move adds exactly
  ``δ`` to the layer's parameter-weighted sparsity ``Σ_j s_j M_j / M``), runs the layer with the
  thresholds ``t_j = quantile(|x_j|, s_j)`` on its dense calibration inputs, and keeps the move with
  the least error ``‖Y_sparse − Y_dense‖²`` on the last 25 % of each sample's tokens; it stops when the
  layer reaches ``p``.  Every layer ends at the same effective sparsity ``p``; only the split across
  its seven matrices differs.  TEAL steps by ``base_step/weight_j`` up to 0.9 and reads the row
  closest to ``p`` at run time; we step to ``p`` directly (``δ = p / ⌈p / step⌉``, default
  ``step = 0.02``, on 4 calibration samples), and use a plain squared error (TEAL's takes a norm over the sequence axis first).
  The magnitudes a layer's thresholds come from are a random sample drawn with a generator of that layer's
  own (:func:`layer_generator`: the run's seed and the layer index), so a resumed run draws the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import options as opt
from ...distributed import DistributedError
from ...engine import Method, run_layerwise
from .. import plan as plans
from ..merge import inner_layer
from ..topk import Threshold, check_level
from .base import SparseMethod, SparseOptions
from .larosa import PREFILL_POLICIES, make_sparse_linear


class Draws:
    """The seeded random sample of ``|x|`` taken of each activation call from ``gen`` (the magnitude
    sampler's runs through the whole walk, layer by layer, sample by sample; TEAL greedy's is one per
    layer, :func:`layer_generator`): at most ``per_call`` values per call.

    Under ``torchrun`` a rank holds a block of the samples (``first`` is its first global index): it
    advances the generator past the draws one process makes for the samples before its block
    (:meth:`__init__`) and after it (:meth:`finish`), and the values of every rank are gathered
    (:meth:`World.gather_rows`, bits moved), so every rank gets the one-process sample.  A sample's draws
    follow from its token count and the activations' ``widths`` (one call each, ``tokens × width``
    values), which each rank checks on its own samples."""

    def __init__(self, gen, per_call: int, widths: dict[str, int], world=None, tokens=(), first: int = 0,
                 total: int = 0):
        self.gen, self.per_call, self.widths, self.world = gen, per_call, widths, world
        self.values: dict[str, list[torch.Tensor]] = {key: [] for key in widths}
        if world is None or world.size == 1:
            self.world = None
            return
        mine = torch.tensor([int(t) for t in tokens], dtype=torch.int64)
        self.tokens = world.gather_rows(mine, torch.arange(first, first + len(mine)), total).tolist()
        self.first, self.stop = first, first + len(mine)
        self.expect = {key: [t * w for t in self.tokens[first:self.stop]] for key, w in widths.items()}
        self._skip(self.tokens[:first])

    def _skip(self, tokens) -> None:
        for t in tokens:
            for w in self.widths.values():
                if t * w > self.per_call:
                    torch.randint(0, t * w, (self.per_call,), generator=self.gen)

    def take(self, key: str, t: torch.Tensor) -> None:
        a = t.detach().reshape(-1).abs().float().cpu()
        if self.world is not None and (not self.expect[key] or self.expect[key].pop(0) != a.numel()):
            raise DistributedError(f"the {key} activation is not one call of tokens × {self.widths[key]} values per "
                                   "sample: its random sample cannot be split across ranks; run it in one process")
        if a.numel() > self.per_call:
            a = a[torch.randint(0, a.numel(), (self.per_call,), generator=self.gen)]
        self.values[key].append(a)

    def finish(self, sort: bool = False) -> dict[str, torch.Tensor]:
        """The sample of each activation (over all ranks), in draw order, or ascending with ``sort`` (for
        many :func:`quantile` lookups in one sample: TEAL greedy's)."""
        out = {k: torch.cat(v) if v else torch.zeros(0) for k, v in self.values.items()}
        if self.world is not None:
            if any(self.expect.values()):
                raise DistributedError("an activation was not observed on every sample: its random sample "
                                       "cannot be split across ranks; run it in one process")
            self._skip(self.tokens[self.stop:])
            for k, v in out.items():
                counts = self.world.gather_ints(v.numel())
                start = sum(counts[: self.world.rank])
                out[k] = self.world.gather_rows(v, torch.arange(start, start + v.numel()), sum(counts))
        return {k: torch.sort(v).values for k, v in out.items()} if sort else out


def _draws(ctx, gen, per_call: int, widths: dict[str, int], inputs, total: int) -> Draws:
    """:class:`Draws` for this rank's ``inputs`` (the first of its block), of ``total`` samples over all ranks."""
    first = ctx.sample_ids.start if ctx.sample_ids is not None else 0
    return Draws(gen, per_call, widths, ctx.world, [x.shape[-2] for x in inputs], first, total)


class MagnitudeSampler(Method):
    """Engine method that only observes: a seeded sample of ``|x|`` per named module input/output,
    through the layer context's observers (:meth:`Method.observers`)."""

    name = "magnitude-sampler"
    distributed = True  # the draws are those of one process, the samples gathered over the ranks (Draws)

    def __init__(self, select, max_values: int = 1 << 18, seed: int = 0, nsamples: int = 1):
        self.select = select  # (layer, adapter) -> {key: (module, "input" | "output", width)}
        self.per_call = max(1024, max_values // max(nsamples, 1) + 1)
        self.gen = torch.Generator().manual_seed(seed)
        self.values: list[dict[str, torch.Tensor]] = []
        self._cur: Draws | None = None

    def step(self, ctx) -> None:
        pass  # the layer is not changed: everything happens in the observers

    def observers(self, ctx):
        selected = self.select(inner_layer(ctx.layer), ctx.adapter)
        self._cur = _draws(ctx, self.gen, self.per_call, {key: s[2] for key, s in selected.items()}, ctx.inputs,
                           ctx.n_samples)
        return [(mod, where, lambda t, key=key: self._cur.take(key, t)) for key, (mod, where, _) in selected.items()]

    def observed(self, ctx) -> None:
        self.values.append(self._cur.finish())
        self._cur = None


def quantile(values: torch.Tensor, level: float, is_sorted: bool = False) -> float:
    """Threshold ``t`` such that a fraction ``level`` of the sample ``values`` lies below it: its element of
    rank ``⌊level·n⌋`` (from 0) in ascending order.  ``values`` in any order (a selection, ``kthvalue``:
    one pass, where a sort of the 2^18-value samples took 17 ms per activation and layer), or ascending
    with ``is_sorted`` (an index: TEAL greedy looks up many levels in one sample)."""
    if level <= 0:
        return 0.0
    n = values.numel()
    k = min(n - 1, int(level * n))
    return float(values[k] if is_sorted else torch.kthvalue(values, k + 1).values)


def _teal_select(layer, adapter):
    out = {}
    for g in adapter.groups:
        reader = layer.get_submodule(g.readers[0])
        out[plans.GROUP_ACTIVATION[g.name]] = (reader, "input", reader.in_features)
    return out


def calibrate_magnitudes(model, adapter, samples, device="cpu", progress=True, select=_teal_select,
                         max_values: int = 1 << 18, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    sampler = MagnitudeSampler(select, max_values=max_values, seed=seed, nsamples=len(samples))
    run_layerwise(model, adapter, sampler, samples, device=device, progress=progress)
    return sampler.values


def teal(model, adapter, samples, sparsity: float, *, plan: str = "uniform", prefill: str = "all", device="cpu",
         progress=True, magnitudes=None) -> dict:
    """Apply TEAL in place (per-projection thresholds); returns a description."""
    if plan not in ("uniform", "exact", "greedy"):
        raise ValueError(f"TEAL allocations are uniform (every projection at p) and greedy, not {plan!r}")
    sparsity = check_level(sparsity)
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"prefill policy must be one of {PREFILL_POLICIES}, got {prefill!r}")
    shapes = plans.layer_shapes(adapter)
    if plan == "greedy":
        return teal_greedy(model, adapter, samples, sparsity, prefill=prefill, device=device, progress=progress)
    if magnitudes is None:
        magnitudes = calibrate_magnitudes(model, adapter, samples, device=device, progress=progress)
    thresholds = [install_thresholds(adapter, i, magnitudes[i], sparsity, prefill) for i in range(len(adapter.layers))]
    return _description(shapes, sparsity, prefill, thresholds)


def install_thresholds(adapter, i: int, magnitudes: dict, sparsity: float, prefill: str) -> dict[str, float]:
    """Every reader of decoder layer ``i`` becomes a ``SparseLinear`` keeping ``|x| ≥ t``, ``t`` the
    ``sparsity``-quantile of its activation's magnitudes; returns ``{activation: t}``."""
    layer = inner_layer(adapter.layers[i])
    th = {}
    for g in adapter.layer_groups(i):
        act = plans.GROUP_ACTIVATION[g.name]
        t = th[act] = quantile(magnitudes[act], sparsity)
        for path in g.readers:
            layer.set_submodule(path, make_sparse_linear(layer.get_submodule(path), Threshold(t), prefill))
    return th


def _description(shapes, sparsity: float, prefill: str, thresholds) -> dict:
    levels = [{p: sparsity for p in sh.masses} for sh in shapes]
    chosen = plans.per_projection(shapes, levels, "uniform", sparsity)
    return {"method": "teal", "prefill": prefill, **chosen.summary(),
            "thresholds": [{k: round(v, 6) for k, v in th.items()} for th in thresholds],
            "note": "threshold sparsity: the realised per-token sparsity fluctuates around the target"}


class ThresholdLayers(MagnitudeSampler):
    """A threshold method (TEAL's uniform plan, CATS) as an engine method, one pass per layer: the
    observers sample magnitudes on the pass of the unchanged layer (the dense chain, as
    :func:`calibrate_magnitudes`), then :meth:`observed` installs the layer's thresholds
    (``observe_then_change``); ``install(adapter, i, magnitudes)`` returns what the description lists
    (JSON values: the resume state keeps it).  ``config``: the sparsity method's options (the resume
    fingerprint; ``install`` and ``describe`` close over them).  A resumed run's replay hooks the observers
    on the same pass, so the one generator draws as in the walk."""

    observe_then_change = True

    def __init__(self, name: str, select, install, describe, max_values: int = 1 << 18, seed: int = 0,
                 config: dict | None = None):
        super().__init__(select, max_values=max_values, seed=seed)
        self.name, self.install, self.describe = name, install, describe
        self.max_values, self.seed = max_values, seed
        self._config = dict(config or {"method": name})

    def config(self) -> dict:
        return {**self._config, "max_values": self.max_values, "seed": self.seed}

    def prepare(self, model, adapter, samples=None) -> None:
        self.per_call = max(1024, self.max_values // max(len(samples or ()), 1) + 1)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.shapes = plans.layer_shapes(adapter)
        self.installed = []

    def observed(self, ctx) -> None:
        super().observed(ctx)
        self.installed.append(self.install(ctx.adapter, ctx.index, self.values.pop()))
        ctx.state["installed"] = self.installed[-1]

    def replayed(self, ctx) -> None:
        """Resume: the observers drew this layer's sample (the generator advances as in the walk); what was
        installed comes back from the checkpoint."""
        super().observed(ctx)
        self.values.pop()
        got = ctx.state["installed"]
        self.installed.append(tuple(got) if isinstance(got, list) else got)

    def description(self) -> dict:
        return self.describe(self.shapes, self.installed)


def layer_generator(seed: int, i: int) -> torch.Generator:
    """The generator of decoder layer ``i``'s random draws, from the run's ``seed`` and ``i`` alone (a
    resumed run draws the same for the layers it has left)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % (1 << 63))


class GreedyAllocation(Method):
    """Engine method for TEAL's block-wise greedy allocation (see the module docstring)."""

    name = "teal-greedy"
    distributed = True  # the magnitude samples (Draws) and the layer errors (plan.layer_tail_error) are gathered
    needs_fp_chain = True  # the search runs each layer on its dense inputs against its dense outputs

    def __init__(self, sparsity: float, step: float = 0.02, tail: float = 0.25, search_samples: int = 4,
                 max_values: int = 1 << 16, prefill: str = "all", seed: int = 0):
        sparsity = check_level(sparsity)
        if not 0 < step <= 0.5:
            raise ValueError(f"greedy step must be in (0, 0.5], got {step}")
        self.sparsity, self.tail, self.search_samples = float(sparsity), float(tail), int(search_samples)
        self.moves, self.delta = plans.greedy_moves(self.sparsity, step)
        self.max_values, self.prefill, self.seed = max_values, prefill, int(seed)
        self.levels: list[dict[str, float]] = []
        self.thresholds: list[dict[str, float]] = []

    def config(self) -> dict:
        return {"method": self.name, "sparsity": self.sparsity, "delta": self.delta, "tail": self.tail,
                "search_samples": self.search_samples, "prefill": self.prefill, "max_values": self.max_values,
                "seed": self.seed}

    def prepare(self, model, adapter, samples=None) -> None:
        self.shapes = plans.layer_shapes(adapter)
        self.levels, self.thresholds = [], []

    def replayed(self, ctx) -> None:
        """Resume: the finished layer's levels and thresholds come back from the checkpoint (``ctx.state``)."""
        self.levels.append(dict(ctx.state["levels"]))
        self.thresholds.append(dict(ctx.state["thresholds"]))

    def description(self) -> dict:
        chosen = plans.per_projection(self.shapes, self.levels, "greedy", self.sparsity)
        return {"method": "teal", "prefill": self.prefill, **chosen.summary(),
                "thresholds": [{k: round(v, 6) for k, v in th.items()} for th in self.thresholds],
                "greedy": {"delta": self.delta, "moves_per_layer": self.moves, "search_samples": self.search_samples,
                           "tail": self.tail},
                "note": "threshold sparsity: the realised per-token sparsity fluctuates around the target; "
                        "levels per projection from TEAL's block-wise greedy search"}

    def _magnitudes(self, ctx, layer, groups, n, total) -> dict[str, torch.Tensor]:
        """Sorted seeded samples of ``|x|`` per projection input (the projections of a group share one) on
        the first ``n`` samples of ``ctx.fp_inputs`` (``total`` over all ranks)."""
        readers = {g.name: layer.get_submodule(g.readers[0]) for g in groups}
        per_call = max(1024, self.max_values // max(total, 1) + 1)
        draws = _draws(ctx, layer_generator(self.seed, ctx.index), per_call, {name: m.in_features for name, m in readers.items()},
                       ctx.fp_inputs[:n], total)
        ctx.collect(readers, lambda name, x, ids: draws.take(name, x), inputs=ctx.fp_inputs[:n])
        return draws.finish(sort=True)

    @torch.no_grad()
    def step(self, ctx) -> None:
        layer, adapter = inner_layer(ctx.layer), ctx.adapter
        n, total = plans.search_count(ctx, self.search_samples)  # this rank's share of the search samples
        groups = list(adapter.groups)
        mags = self._magnitudes(ctx, layer, groups, n, total)
        masses, group_of, modules = {}, {}, {}
        for g in groups:
            for path in g.readers:
                proj = plans.projection_name(path)
                mod = layer.get_submodule(path)
                masses[proj] = mod.weight.shape[0] * mod.weight.shape[1]
                group_of[proj] = g.name
                sparse = make_sparse_linear(mod, Threshold(0.0), "all")
                layer.set_submodule(path, sparse)
                modules[proj] = (path, sparse)

        def apply(levels):
            for p, lv in levels.items():
                modules[p][1].selector = Threshold(quantile(mags[group_of[p]], lv, is_sorted=True))

        levels, err = plans.greedy_levels(masses, self.sparsity, self.delta,
                                          lambda: plans.layer_tail_error(ctx, n, self.tail, total), apply)
        errs = {} if err is None else {"error": err}
        final = {}
        for p, (path, sparse) in modules.items():
            final[p] = sparse.threshold
            if self.prefill != "all":  # rebuild with the requested prefill policy, same threshold
                layer.set_submodule(path, make_sparse_linear(sparse, sparse.selector, self.prefill))
        self.levels.append(dict(levels))
        self.thresholds.append(final)
        ctx.state.update(levels=dict(levels), thresholds=dict(final))  # for a resumed run (replayed)
        ctx.info["teal_greedy"] = {"levels": {p: round(v, 4) for p, v in levels.items()},
                                   "effective": round(sum(levels[p] * masses[p] for p in levels)
                                                      / sum(masses.values()), 4), **errs}


def teal_greedy(model, adapter, samples, sparsity: float, *, prefill: str = "all", device="cpu", progress=True,
                step: float = 0.02, search_samples: int = 4) -> dict:
    """TEAL with the block-wise greedy allocation, in place; returns a description."""
    method = GreedyAllocation(sparsity, step=step, search_samples=search_samples, prefill=prefill)
    run_layerwise(model, adapter, method, samples, device=device, progress=progress)
    return method.description()


@dataclass(frozen=True)
class TEALOptions(SparseOptions):
    plan: str = opt.option("uniform", opt.choice("uniform", "exact", "greedy"),
                           "uniform (every projection at the level) or greedy (TEAL's block-wise greedy split across "
                           "the seven matrices)")


class TEAL(SparseMethod):
    """TEAL (see the module docstring): per-projection magnitude thresholds."""

    name = "teal"
    Options = TEALOptions

    def layer_method(self) -> Method:
        sparsity, prefill = self.sparsity, self.options.prefill
        if self.options.plan == "greedy":
            return GreedyAllocation(sparsity, prefill=prefill)
        return ThresholdLayers("teal", _teal_select,
                               lambda adapter, i, mags: install_thresholds(adapter, i, mags, sparsity, prefill),
                               lambda shapes, installed: _description(shapes, sparsity, prefill, installed),
                               config=self.config())
