"""Calibration data (:mod:`.calibration`) and named data sets (:mod:`.named`, which needs no torch)."""

__all__ = ["CalibrationSet", "CalibrationError"]


def __getattr__(name):  # CalibrationSet, CalibrationError: imported on first use
    if name in __all__:
        from . import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module 'mmcompress.data' has no attribute {name!r}")
