"""``mmcompress.quantize``: one verb over the layer-by-layer engine."""

from __future__ import annotations

import time

from .. import finite
from ..data.calibration import CalibrationError, CalibrationSet
from ..engine import run_layerwise
from ..models.adapters import get_adapter
from .quantizer import QuantScheme, resolve_scheme


def make_method(method: str, scheme: QuantScheme, **options):
    """The registered method ``method`` with ``options`` (checked by its ``Options``)."""
    from .methods import QUANT_METHODS

    name = method.lower()
    if name not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(sorted(QUANT_METHODS))}")
    return QUANT_METHODS[name](scheme, **options)


def _as_set(samples, what: str) -> CalibrationSet:
    cs = samples if isinstance(samples, CalibrationSet) else CalibrationSet(list(samples))
    if len(cs) == 0:
        raise CalibrationError(f"{what} is empty")
    return cs


def _sample_key(sample: dict) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for k in sorted(sample):
        v = sample[k]
        if hasattr(v, "detach"):
            t = v.detach().cpu().contiguous()
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_disjoint(calib: CalibrationSet, other: CalibrationSet, what: str) -> None:
    """Refuse a ``what`` set that shares a sample (same token ids and media) with the calibration set."""
    seen = {_sample_key(s) for s in calib.samples}
    shared = sum(_sample_key(s) in seen for s in other.samples)
    if shared:
        raise CalibrationError(f"the {what} shares {shared} of its {len(other)} samples with the calibration set; "
                               "held-out measurements need disjoint data")


def describe(m, calib: CalibrationSet, adapter, infos: list[dict], extra: dict | None = None, seconds=None) -> dict:
    """The description of a quantization (``mmcompress.json``): method, scheme, calibration, per-layer infos."""
    desc = {"kind": "quantization", "method": m.config(), "scheme": m.scheme.name,
            "calibration": calib.summary(adapter.modality_token_ids), **(extra or {}), "layers": infos}
    if seconds is not None:
        desc["seconds"] = seconds
    summary = m.method_summary()
    if summary:
        desc["method_summary"] = summary
    return desc


def whole_model_prepare(m, adapter) -> bool:
    """Whether ``m.prepare`` probes the whole model (MBQ/MASQuant ``loss_weights="auto"`` on multimodal
    data: gradient ratios): it must then see the model as the steps before it left it, not stream."""
    from .methods.gradients import probes_gradients

    return probes_gradients(getattr(m.options, "loss_weights", None), adapter)


def quantize(model, calib, method: str = "rtn", scheme: str | QuantScheme = "w8a8", *, device="cpu",
             checkpoint_dir=None, resume=False, progress=True, report_dir=None, report_tag=None, report_calib=None,
             report_plot=True, whitening=None, reference_cache=None, **options):
    """Quantize ``model`` in place with ``method`` and return it.

    ``calib`` is a :class:`~mmcompress.data.CalibrationSet` (or a list of model-input dicts);
    ``scheme`` a name (``w8a8``, ``w4a8``, ``w4a6``, ``w4a16``) or a :class:`QuantScheme`.
    Extra keyword ``options`` go to the method (e.g. ``alpha=0.5`` for SmoothQuant).
    ``report_dir``: write per-modality diagnostics (JSON) and the SQNR-by-modality plot there;
    ``report_calib``: held-out samples (disjoint from ``calib``) to measure them on, instead of the
    calibration samples; ``report_plot=False``: the JSON only, for a caller that renders the report once at
    the end (``mmcompress.eval.report.render_report`` draws the plot).  ``whitening`` (MASQuant): a separate whitening set, e.g. image-only and
    audio-only samples as in the paper; CMC's covariance of modality ``m`` then comes from its tokens
    of modality ``m`` instead of the calibration set's.
    ``reference_cache``: an :class:`mmcompress.engine.ReferenceCache` shared by several ``quantize`` calls
    on copies of the same input model (methods compared on the same calibration and held-out sets): the
    captures and the uncompressed chains are computed once (same results).
    """
    if isinstance(scheme, str):
        scheme = resolve_scheme(scheme)
    adapter = get_adapter(model)
    if not isinstance(calib, CalibrationSet):
        calib = CalibrationSet(list(calib))
    if len(calib) == 0:
        raise CalibrationError("calibration set is empty")
    m = make_method(method, scheme, **options)
    side_sets, extra = {}, {}
    if whitening is not None:
        if "whitening" not in m.side_sets:
            raise ValueError(f"a whitening set applies to masquant, not {m.name}")
        whitening = _as_set(whitening, "whitening set")
        m.set_whitening(whitening.token_counts(adapter.modality_token_ids))
        side_sets["whitening"] = whitening.samples
        extra["whitening"] = whitening.summary(adapter.modality_token_ids)
    if report_calib is not None:
        if report_dir is None:
            raise ValueError("report_calib needs report_dir (the held-out set is what the report measures on)")
        report_calib = _as_set(report_calib, "report set")
        check_disjoint(calib, report_calib, "report set")
        extra["report_calib"] = report_calib.summary(adapter.modality_token_ids)
    finite.check_module(model, "input weight")
    diagnostics = None
    if report_dir is not None:
        from .diagnostics import Diagnostics

        diagnostics = Diagnostics(None if report_calib is None else report_calib.samples,
                                  None if report_calib is None else report_calib.source)
    t0 = time.time()
    infos = run_layerwise(model, adapter, m, calib.samples, device=device, checkpoint_dir=checkpoint_dir,
                          resume=resume, progress=progress, diagnostics=diagnostics, side_sets=side_sets,
                          reference_cache=reference_cache)
    model._mmcompress_description = describe(m, calib, adapter, infos, extra, seconds=round(time.time() - t0, 2))
    finite.check_module(model, f"the {m.name} result")
    if diagnostics is not None:
        from .diagnostics import write_report

        desc = dict(model._mmcompress_description, report_tag=report_tag)
        model._mmcompress_description["report"] = str(write_report(report_dir, diagnostics, desc, plot=report_plot))
    adapter.install_router()
    return model
