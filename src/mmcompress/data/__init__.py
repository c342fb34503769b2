from .calibration import CalibrationError, CalibrationSet

__all__ = ["CalibrationSet", "CalibrationError"]
