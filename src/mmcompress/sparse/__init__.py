from . import linear  # noqa: F401  (registers SparseLinear for artifacts)
