"""The sparse half of the compressed-module registry (it lives in :mod:`mmcompress.specs`)."""

from ..specs import SPARSE_MODULES, register_sparse_module  # noqa: F401
