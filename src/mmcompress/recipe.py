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


def apply_recipe(model, calib, steps: list[dict], *, device="cpu", progress=True):
    """Apply the steps in order; the model's description lists every step's own description."""
    from .quant.api import quantize
    from .sparse.api import sparsify
    from .sparse.joint import quantize_residual_adapters

    descriptions = []
    for step in steps:
        opts = {k: v for k, v in step.items() if k != "kind"}
        method = opts.pop("method")
        if step["kind"] == "sparsify":
            sparsity = opts.pop("sparsity", 0.4)
            sparsify(model, calib, method=method, sparsity=sparsity, device=device, progress=progress, **opts)
        else:
            scheme = opts.pop("scheme", "w8a8")
            adapters = opts.pop("adapters", "float")
            quantize(model, calib, method=method, scheme=scheme, device=device, progress=progress, **opts)
            n = quantize_residual_adapters(model, adapters)
            if n:
                model._mmcompress_description["residual_adapters"] = {"scheme": adapters, "count": n}
        descriptions.append(model._mmcompress_description)
    model._mmcompress_description = {"kind": "recipe", "steps": descriptions,
                                     "seconds": round(sum(d.get("seconds", 0) for d in descriptions), 2)}
    return model
