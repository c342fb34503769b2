from . import linear  # noqa: F401  (registers SparseLinear for artifacts)
from . import merge  # noqa: F401  (registers the LaRoSA / TEAL / CATS modules: residual adapters, rotated norms, ...)
