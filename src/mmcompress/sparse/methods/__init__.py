"""Activation-sparsity methods, one module each; ``SPARSE_METHODS`` maps CLI names to classes
(:class:`~.base.SparseMethod`, registered the way :data:`mmcompress.quant.methods.QUANT_METHODS` is)."""

from .cats import CATS
from .larosa import LaRoSA
from .teal import TEAL
from .wina import WINA

SPARSE_METHODS = {"larosa": LaRoSA, "teal": TEAL, "cats": CATS, "wina": WINA}

__all__ = ["LaRoSA", "TEAL", "CATS", "WINA", "SPARSE_METHODS"]
