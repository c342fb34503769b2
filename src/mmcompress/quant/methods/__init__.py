"""Quantization methods, one module each; ``QUANT_METHODS`` maps CLI names to classes."""

from .masquant import MASQuant
from .rtn import RTN
from .smoothquant import SmoothQuant

QUANT_METHODS = {"rtn": RTN, "smoothquant": SmoothQuant, "masquant": MASQuant}


def register(name, cls):
    QUANT_METHODS[name] = cls


__all__ = ["RTN", "SmoothQuant", "MASQuant", "QUANT_METHODS"]
