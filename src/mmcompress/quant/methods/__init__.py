"""Quantization methods, one module each; ``QUANT_METHODS`` maps CLI names to classes."""

from .awq import AWQ
from .masquant import MASQuant
from .mbq import MBQ
from .rtn import RTN
from .smoothquant import SmoothQuant

QUANT_METHODS = {"rtn": RTN, "smoothquant": SmoothQuant, "masquant": MASQuant, "awq": AWQ, "mbq": MBQ}


__all__ = ["RTN", "SmoothQuant", "AWQ", "MBQ", "MASQuant", "QUANT_METHODS"]
