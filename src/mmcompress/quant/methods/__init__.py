"""Quantization methods, one module each; ``QUANT_METHODS`` maps CLI names to classes."""

from .rtn import RTN
from .smoothquant import SmoothQuant

QUANT_METHODS = {"rtn": RTN, "smoothquant": SmoothQuant}


def register(name, cls):
    QUANT_METHODS[name] = cls


__all__ = ["RTN", "SmoothQuant", "QUANT_METHODS"]
