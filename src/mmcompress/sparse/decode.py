"""Fast sparse decoding, model-wide: every sparse module of a model switched to a kernel backend.

Sits above the modules it switches (:class:`~mmcompress.sparse.linear.SparseLinear`, LaRoSA's
:class:`~mmcompress.sparse.merge.ResidualAdaptedLayer`, the deployed
:class:`~mmcompress.sparse.joint.SparseInt8Linear`)."""

from __future__ import annotations

from torch import nn

from ..memory import trim_heap
from ..quant.deployed import deployed_form
from ..quant.linear import QuantLinear
from .joint import SparseInt8Linear, deploy
from .linear import _SELECTION, sparse_linears
from .merge import ResidualAdaptedLayer


def set_sparse_backend(model: nn.Module, backend: str = "auto", sparse_prefill: bool | None = None) -> int:
    """Switch every :class:`SparseLinear` of ``model`` to ``backend`` (re-laying out its weight).

    ``sparse_prefill``: ``None`` leaves each module's setting alone; ``False`` makes multi-token calls
    (prefill) run dense, ``True`` sparsifies them (PyTorch path).  Other modules (e.g. LaRoSA's dense
    residual adapters, the LM head) are untouched.  Returns the number of modules switched.
    """
    mods = sparse_linears(model)
    for m in mods:
        m.set_backend(backend)
        if sparse_prefill is not None:
            m.sparse_prefill = bool(sparse_prefill)
    for m in model.modules():  # LaRoSA's residual adapters, deployed sparse int8 projections
        if isinstance(m, ResidualAdaptedLayer):
            m.set_adapter_backend(backend)
        elif isinstance(m, SparseInt8Linear):
            m.backend = backend
    _SELECTION.clear()
    if mods:
        trim_heap()  # the weights the new layout replaced: back to the system, not left in the resident set
    return len(mods)


def enable_sparse_decode(model: nn.Module, backend: str = "auto", sparse_prefill: bool = False) -> int:
    """Fast sparse decoding: every ``SparseLinear`` uses the kernel ``backend`` for decode steps while
    prefill runs dense (unless ``sparse_prefill``).  Note: dense prefill changes the numerics relative
    to an all-token evaluation.  LaRoSA's residual adapters use the dense GEMV
    kernel for decode steps, and packed W8A8 projections with a Top-K input (a LaRoSA + RTN recipe) are
    deployed on the sparse int8 kernel (:func:`mmcompress.sparse.joint.deploy`; their prefill honours
    the ``sparse_prefill`` saved with them); 8-bit quantized residual adapters go on the integer
    path.  Returns the number of modules switched or deployed."""
    n = set_sparse_backend(model, backend, sparse_prefill=sparse_prefill)
    for m in model.modules():
        if isinstance(m, ResidualAdaptedLayer) and isinstance(m.residual_adapter, QuantLinear):
            m.residual_adapter = deployed_form(m.residual_adapter)
            n += not isinstance(m.residual_adapter, QuantLinear)
    return n + deploy(model, backend)[0]


def disable_sparse_decode(model: nn.Module) -> int:
    """Back to the PyTorch reference path and the row-major weight layout."""
    return set_sparse_backend(model, "torch")
