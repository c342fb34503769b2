"""What every activation-sparsity method is to the rest of the program: a registered class with an
option table, the way quantization methods are (:mod:`mmcompress.quant.methods`).

``OPTIONS`` maps each option (a recipe key; the CLI flags map onto them) to its validator
(:mod:`mmcompress.options`), so ``sparsify``, ``compress --recipe`` and ``mmcompress sparsify`` refuse
the same values with the same message.  ``sparsity`` is every method's target model-level sparsity,
checked by :data:`~mmcompress.sparse.topk.LEVEL` (the one range check of a sparsity level).  A method's
calibration passes are engine methods (:class:`mmcompress.engine.Method`) that observe through the layer
context (``observers``); :meth:`SparseMethod.apply` runs them and the method's model surgery.
"""

from __future__ import annotations

from ... import options as opt
from ..topk import LEVEL

PREFILL = opt.choice("all", "none", "last_half")


class SparseMethod:
    """A sparsity method: ``OPTIONS`` (validators), then :meth:`apply` on a model."""

    name = "sparse"
    OPTIONS: dict = {"sparsity": LEVEL}
    rotating = False  # transforms whole layers: the adapter's ``sparsity_blocker`` applies

    def __init__(self, **options):
        self.options = opt.check_options(self.OPTIONS, options)
        self.sparsity = float(self.options.pop("sparsity", 0.4))

    def config(self) -> dict:
        return {"method": self.name, "sparsity": self.sparsity, **self.options}

    def apply(self, model, adapter, samples, *, device="cpu", progress=True) -> dict:
        """Sparsify ``model`` in place; returns the description saved as ``mmcompress.json``'s ``method``."""
        raise NotImplementedError
