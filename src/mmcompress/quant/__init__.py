from .linear import QuantLinear
from .quantizer import SCHEMES, QuantScheme, resolve_scheme

__all__ = ["QuantLinear", "QuantScheme", "SCHEMES", "resolve_scheme"]
