"""Composing methods: a recipe is a list of steps applied in order to one model, saved as one artifact.

A recipe file (YAML or JSON)::

    steps:
      - sparsify: {method: larosa, sparsity: 0.4}      # LaRoSA merged model, exact 40 % plan
      - quantize: {method: rtn, scheme: w8a8}          # then W8A8 on the rotated, sparse model

Every step uses the same calibration set.  Quantizing after activation sparsity keeps each
projection's Top-K (or threshold) in front of the quantizer: ``y = Q_a(S_k(x) / s) Ŵᵀ``; smoothing
is then a run-time division (folding it into a norm would change which channels Top-K keeps).  The
same step keeps LaRoSA's residual adapters in the model's dtype (``adapters: float``, the default) or
stores them as 8-bit weight-only linears (``adapters: w8a16``: half their decode bytes, at a measured
perplexity cost; see :func:`mmcompress.sparse.joint.quantize_residual_adapters`).
MASQuant is not available after sparsity (its training forward has no sparse path).
"""

from __future__ import annotations

import json
from pathlib import Path

STEP_KINDS = ("sparsify", "quantize")
QUANT_AFTER_SPARSITY = ("rtn", "smoothquant", "awq", "mbq")


class RecipeError(ValueError):
    pass


def load_recipe(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise RecipeError(f"{path}: cannot parse recipe ({str(e).splitlines()[0]})") from None
    return parse_recipe(data, str(path))


def parse_recipe(data, source="recipe") -> list[dict]:
    steps = data.get("steps") if isinstance(data, dict) else data
    if not isinstance(steps, list) or not steps:
        raise RecipeError(f"{source}: expected a non-empty list of steps under 'steps'")
    out = []
    seen_sparsity = False
    for n, step in enumerate(steps, 1):
        if not isinstance(step, dict) or len(step) != 1:
            raise RecipeError(f"{source}: step {n} must be one of {{sparsify: {{...}}}} or {{quantize: {{...}}}}")
        kind, opts = next(iter(step.items()))
        if kind not in STEP_KINDS:
            raise RecipeError(f"{source}: step {n}: unknown step {kind!r}; use {' or '.join(STEP_KINDS)}")
        opts = dict(opts or {})
        if "method" not in opts:
            raise RecipeError(f"{source}: step {n} ({kind}) needs a 'method'")
        if kind == "quantize" and seen_sparsity and opts["method"] not in QUANT_AFTER_SPARSITY:
            raise RecipeError(f"{source}: step {n}: {opts['method']} cannot follow activation sparsity; "
                              f"use one of {', '.join(QUANT_AFTER_SPARSITY)}")
        seen_sparsity |= kind == "sparsify"
        out.append({"kind": kind, **_check_step(kind, opts, f"{source}: recipe step {n}")})
    return out


def _check_step(kind: str, opts: dict, where: str) -> dict:
    """Validate a step's options with the method's ``Options`` (the CLI's checks and messages)."""
    from .options import OptionError
    from .quant.methods import QUANT_METHODS
    from .quant.quantizer import resolve_scheme
    from .sparse.methods import SPARSE_METHODS

    method = opts.pop("method")
    adapters = opts.pop("adapters", None) if kind == "quantize" else None
    if adapters is not None:
        from .sparse.joint import check_adapter_scheme

        try:
            check_adapter_scheme(adapters)
        except ValueError as e:
            raise RecipeError(f"{where} ({kind}): {e}") from None
    tables = QUANT_METHODS if kind == "quantize" else SPARSE_METHODS
    if not isinstance(method, str) or method.lower() not in tables:
        raise RecipeError(f"{where} ({kind}): unknown method {method!r}; choose one of {', '.join(sorted(tables))}")
    method = method.lower()
    if kind == "quantize" and "scheme" in opts:
        try:
            resolve_scheme(opts["scheme"])
        except (ValueError, AttributeError) as e:
            raise RecipeError(f"{where} ({method}): scheme {e}") from None
    try:
        checked = tables[method].Options.check({k: v for k, v in opts.items() if not (kind == "quantize" and k == "scheme")},
                                               method)
    except OptionError as e:
        raise RecipeError(f"{where} ({method}): {e}") from None
    return {"method": method, **opts, **checked, **({"adapters": adapters} if adapters is not None else {})}


def apply_recipe(model, calib, steps: list[dict], *, device="cpu", progress=True, checkpoint_dir=None,
                 resume: bool = False):
    """Apply the steps in order, in one layer-by-layer walk; the model's description lists every step's
    own description.

    The steps run as one :class:`~mmcompress.engine.Sequence`: one capture, and for each decoder layer
    every step in order, each seeing what a walk of its own over the previous steps' model would give it
    (so the artifact is the one the steps would make one after another).  Passes per layer: see
    :class:`~mmcompress.engine.Sequence` (LaRoSA then RTN: two, LaRoSA then SmoothQuant: three).  Some steps
    end the walk: MBQ with gradient-probed loss weights on multimodal data starts a new one (its probe
    before the walk must see the sparse model); LaRoSA's ``grid`` plan picks its K after its walk
    (``chooses_at_end``), so the steps after it walk again; LaRoSA merged with ``basis: both`` finishes layer
    l after layer l+1's pass (``lookahead``: layer l's residual adapter needs the basis of layer l+1, fitted
    to that layer's MLP input too) and walks alone.  A streamed model walks again from the previous walk's
    result, written as an intermediate model (:func:`mmcompress.streaming.restream`).
    ``checkpoint_dir``: the engine's per-layer checkpoints (a streamed model needs one); ``resume``: continue
    the walk checkpointed there (a recipe of one walk; see :attr:`~mmcompress.engine.Sequence.resumable`).
    """
    import time

    from .data.calibration import CalibrationSet
    from .engine import Sequence, run_layerwise
    from .models.adapters import get_adapter
    from .quant.api import describe, make_method, whole_model_prepare
    from .quant.quantizer import resolve_scheme
    from .sparse.api import check_sparsifiable, make_sparse_method
    from .sparse.joint import ResidualAdapterQuant

    adapter = get_adapter(model)
    if not isinstance(calib, CalibrationSet):
        calib = CalibrationSet(list(calib))
    model.eval()
    walks: list[list] = [[]]  # runs of (step index, engine method) sharing one walk
    made = []
    for n, step in enumerate(steps):
        opts = {k: v for k, v in step.items() if k != "kind"}
        method = opts.pop("method")
        if step["kind"] == "sparsify":
            m = make_sparse_method(method, sparsity=opts.pop("sparsity", 0.4), **opts)
            check_sparsifiable(adapter, m)
            walk = m.layer_method()
            parts = [walk]
        else:
            scheme = resolve_scheme(opts.pop("scheme", "w8a8"))
            adapters = opts.pop("adapters", "float")
            m = walk = make_method(method, scheme, **opts)
            if whole_model_prepare(m, adapter) and walks[-1]:
                walks.append([])
            parts = [m] + ([ResidualAdapterQuant(adapters)] if adapters != "float" else [])
        made.append((step["kind"], m, walk, parts))
        if walk.lookahead and walks[-1]:  # it walks alone
            walks.append([])
        walks[-1].extend((n, p) for p in parts)
        if walk.chooses_at_end or walk.lookahead:  # its layers are set after the walk: the next steps walk again
            walks.append([])
    streamed = getattr(model, "_mmcompress_stream", None) is not None
    walks = [w for w in walks if w]
    if resume and len(walks) > 1:
        raise ValueError(f"this recipe runs in {len(walks)} walks (a step needs a walk of its own), which cannot be "
                         "resumed; run without --resume")
    descriptions: dict[int, dict] = {}
    t_start, done = time.time(), set()
    timing = []
    for n in range(len(steps)):
        if n in done:
            continue
        t0 = time.time()
        group = next(w for w in walks if w[0][0] == n)
        if streamed and group is not walks[0]:  # the next walk streams what the previous one made
            from .streaming import restream

            restream(model, checkpoint_dir)
        methods = [p for _, p in group]
        walk = methods[0] if len(methods) == 1 else Sequence(*methods)
        infos = run_layerwise(model, adapter, walk, calib.samples, device=device, progress=progress,
                              checkpoint_dir=checkpoint_dir, resume=resume)
        for k in dict.fromkeys(k for k, _ in group):
            kind, m, w, parts = made[k]
            if kind == "sparsify":
                descriptions[k] = _sparse_description(w.description(), calib, adapter)
            else:
                descriptions[k] = describe(m, calib, adapter, infos)
                if len(parts) > 1 and parts[1].count:
                    descriptions[k]["residual_adapters"] = {"scheme": parts[1].scheme, "count": parts[1].count}
            done.add(k)
        timing.append({"steps": sorted({k + 1 for k, _ in group}), "seconds": round(time.time() - t0, 2),
                       "walk": "one layer-by-layer walk"})
    adapter.install_router()
    model._mmcompress_description = {"kind": "recipe", "steps": [descriptions[n] for n in range(len(steps))],
                                     "walks": timing, "seconds": round(time.time() - t_start, 2)}
    return model


def _sparse_description(info: dict, calib, adapter) -> dict:
    return {"kind": "activation_sparsity", "method": info, "calibration": calib.summary(adapter.modality_token_ids)}
