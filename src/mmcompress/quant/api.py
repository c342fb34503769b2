"""``mmcompress.quantize``: one verb over the layer-by-layer engine."""

from __future__ import annotations

import time

from .. import finite
from ..data.calibration import CalibrationError, CalibrationSet
from ..engine import run_layerwise
from ..models.adapters import get_adapter
from .quantizer import QuantScheme, resolve_scheme


def make_method(method: str, scheme: QuantScheme, **options):
    from ..options import check_options
    from .methods import QUANT_METHODS

    name = method.lower()
    if name not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(sorted(QUANT_METHODS))}")
    cls = QUANT_METHODS[name]
    return cls(scheme, **check_options(cls.OPTIONS, options))


def quantize(model, calib, method: str = "rtn", scheme: str | QuantScheme = "w8a8", *, device="cpu",
             checkpoint_dir=None, resume=False, progress=True, report_dir=None, report_tag=None, **options):
    """Quantize ``model`` in place with ``method`` and return it.

    ``calib`` is a :class:`~mmcompress.data.CalibrationSet` (or a list of model-input dicts);
    ``scheme`` a name (``w8a8``, ``w4a8``, ``w4a6``, ``w4a16``) or a :class:`QuantScheme`.
    Extra keyword ``options`` go to the method (e.g. ``alpha=0.5`` for SmoothQuant).
    ``report_dir``: write per-modality diagnostics (JSON) and the SQNR-by-modality plot there.
    """
    if isinstance(scheme, str):
        scheme = resolve_scheme(scheme)
    adapter = get_adapter(model)
    if not isinstance(calib, CalibrationSet):
        calib = CalibrationSet(list(calib))
    if len(calib) == 0:
        raise CalibrationError("calibration set is empty")
    m = make_method(method, scheme, **options)
    finite.check_module(model, "input weight")
    diagnostics = None
    if report_dir is not None:
        from ..eval.diagnostics import Diagnostics

        diagnostics = Diagnostics()
    t0 = time.time()
    infos = run_layerwise(model, adapter, m, calib.samples, device=device, checkpoint_dir=checkpoint_dir,
                          resume=resume, progress=progress, diagnostics=diagnostics)
    model._mmcompress_description = {
        "kind": "quantization",
        "method": m.config(),
        "scheme": scheme.name,
        "calibration": calib.summary(adapter.modality_token_ids),
        "layers": infos,
        "seconds": round(time.time() - t0, 2),
    }
    finite.check_module(model, f"the {m.name} result")
    summary = getattr(model, "_mmcompress_method_summary", None)
    if summary:
        model._mmcompress_description["method_summary"] = summary
    if diagnostics is not None:
        from ..eval.diagnostics import write_report

        desc = dict(model._mmcompress_description, report_tag=report_tag)
        model._mmcompress_description["report"] = str(write_report(report_dir, diagnostics, desc))
    adapter.install_router()
    return model
