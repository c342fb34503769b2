"""``mmcompress.sparse.api.sparsify``: activation sparsity (LaRoSA, TEAL, CATS, WINA) in one verb.

    sparsify(model, calib, method="larosa", sparsity=0.4, plan="exact", mode="merged", prefill="all")

``sparsity`` is the target *model-level* sparsity (parameter-weighted over q, k, v, o, gate, up, down);
the description attached to the model (``model._mmcompress_description``, saved into
``mmcompress.json``) states the method, the mode (LaRoSA: merged M or reference R), the plan, the
prefill policy and the achieved model-level sparsity.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .. import finite
from ..data.calibration import CalibrationError, CalibrationSet
from ..models.adapters import UnsupportedModelError, get_adapter
from ..options import option_table
from . import plan as plans
from .merge import ThresholdedActivation, inner_layer
from .methods import SPARSE_METHODS
from .methods.base import SparseMethod


def sparsify(model: nn.Module, calib, method: str = "larosa", sparsity: float = 0.4, *, plan: str | None = None,
             mode: str | None = None, prefill: str | None = None, device="cpu", progress: bool = True,
             checkpoint_dir=None, resume: bool = False, **options) -> nn.Module:
    """Sparsify ``model`` in place and return it (see module docstring).

    ``method``: a name of :data:`~.methods.SPARSE_METHODS`; ``sparsity`` and the other options are
    checked by its ``Options`` (``None``: the method's default).
    ``plan``: LaRoSA ``exact`` (default) | ``uniform`` (reference 0.8/1.2 split) | ``grid`` | ``greedy``;
    TEAL ``uniform`` (default) | ``greedy``; WINA ``uniform`` | ``greedy``; CATS has none.
    ``mode`` (LaRoSA only): ``merged`` | ``reference``.
    ``prefill``: ``all`` (paper protocol) | ``none`` (dense prefill) | ``last_half`` (TEAL protocol).
    One layer-by-layer walk (:meth:`~.methods.base.SparseMethod.layer_method`; the plan searches too);
    ``checkpoint_dir``: the engine's per-layer checkpoints (a streamed model needs one); ``resume``: continue
    the run checkpointed there (not LaRoSA merged with ``basis="both"``, which finishes each layer one late).
    """
    m = make_sparse_method(method, sparsity=sparsity, plan=plan, mode=mode, prefill=prefill, **options)
    adapter = get_adapter(model)
    check_sparsifiable(adapter, m)
    if not isinstance(calib, CalibrationSet):
        calib = CalibrationSet(list(calib))
    if len(calib) == 0:
        raise CalibrationError("calibration set is empty")
    finite.check_module(model, "input weight")
    t0 = time.time()
    model.eval()
    info = m.apply(model, adapter, calib.samples, device=device, progress=progress, checkpoint_dir=checkpoint_dir,
                   resume=resume)
    finite.check_module(model, f"the {m.name} result")
    model._mmcompress_description = {
        "kind": "activation_sparsity",
        "method": {**m.config(), **info},  # every option (Options), then what the run chose and achieved
        "calibration": calib.summary(adapter.modality_token_ids),
        "seconds": round(time.time() - t0, 2),
    }
    adapter.install_router()
    return model


def check_sparsifiable(adapter, m: SparseMethod) -> None:
    """Refuse a model family the method cannot sparsify (``UnsupportedModelError`` with the reason)."""
    if adapter.sparsity_blocker and m.rotating:
        from ..models.adapters import FAMILIES

        ok = sorted(t for t, f in FAMILIES.items() if f.sparsity_blocker is None)
        raise UnsupportedModelError(f"{m.name} cannot sparsify {adapter.family}: {adapter.sparsity_blocker}; "
                                    f"model types it supports: {', '.join(ok)}")
    if adapter.moe:  # TEAL/CATS thresholds are per projection role; an expert sees only its routed tokens
        raise UnsupportedModelError(f"{m.name} cannot sparsify {adapter.family}: its MoE experts need per-expert "
                                    "thresholds calibrated on the tokens routed to each expert, which the "
                                    "sparsity plans (one level per projection role) do not model yet")


def make_sparse_method(method: str, **options) -> SparseMethod:
    """The registered method ``method`` with ``options`` checked by its ``Options`` (``None``
    values are left to the method's defaults; ``mode="merged"`` is ignored by methods without modes)."""
    name = method.lower()
    if name not in SPARSE_METHODS:
        raise ValueError(f"unknown sparsity method {method!r}; choose one of {', '.join(SPARSE_METHODS)}")
    cls = SPARSE_METHODS[name]
    options = {k: v for k, v in options.items() if v is not None}
    if "mode" not in option_table(cls.Options) and options.get("mode") == "merged":
        del options["mode"]
    return cls(**options)


@torch.no_grad()
def measure_sparsity(model: nn.Module, samples, adapter=None) -> dict:
    """Run ``samples`` and measure the zero fraction of every projection's effective input.

    Returns ``{"model_sparsity": S, "per_activation": {h1..h4: mean over layers}}`` where S is the
    parameter-weighted mean over q, k, v, o, gate, up, down (up counts the zeros of the CATS gate)."""
    adapter = adapter or get_adapter(model)
    shapes = plans.layer_shapes(adapter)
    counts = [{p: [0.0, 0] for p in sh.masses} for sh in shapes]
    handles, wrapped = [], []
    pending: dict[nn.Module, torch.Tensor] = {}  # a projection's input until its effective input is counted
    for i, layer in enumerate(adapter.layers):
        layer = inner_layer(layer)
        cats_gate = any(isinstance(m, ThresholdedActivation) for m in layer.modules())
        for g in adapter.layer_groups(i):
            for path in g.readers:
                proj = plans.projection_name(path)
                if cats_gate and proj == "up":  # counted from the gate's zeros at the down input
                    continue
                mod = layer.get_submodule(path)
                projs = (proj, "up") if (cats_gate and proj == "down") else (proj,)

                def count(x, i=i, projs=projs):
                    z = float((x == 0).sum())
                    for p in projs:
                        counts[i][p][0] += z
                        counts[i][p][1] += x.numel()

                def before(m, args):
                    pending[m] = args[0]

                def after(m, args, output, count=count):
                    x = pending.pop(m, None)
                    if x is not None:  # not counted in its forward: a plain linear, or a kernel path
                        count(type(m).sparsify(m, x) if hasattr(m, "sparsify") else x)

                if hasattr(mod, "sparsify"):  # SparseLinear, WinaLinear: count the result its forward computes
                    def sparsify(x, m=mod, count=count):
                        out = type(m).sparsify(m, x)
                        if pending.get(m) is x:
                            del pending[m]
                            count(out)
                        return out

                    mod.sparsify = sparsify  # an instance attribute over the method, removed below
                    wrapped.append(mod)
                handles += [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]
    try:
        for s in samples:
            model(**s, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for m in wrapped:
            del m.sparsify
        pending.clear()
    levels = [{p: (c[0] / c[1] if c[1] else 0.0) for p, c in lc.items()} for lc in counts]
    pl = plans.per_projection(shapes, levels, "measured", 0.0)
    per_act = {a: sum(pl.level(i, a) for i in range(len(shapes))) / len(shapes) for a in plans.READERS_OF}
    return {"model_sparsity": pl.model_sparsity(), "per_activation": per_act, "levels": levels}
