"""What every activation-sparsity method is to the rest of the program: a registered class with an
options dataclass, the way quantization methods are (:mod:`mmcompress.quant.methods`).

``Options`` (:class:`mmcompress.options.Options`) gives the recipe keys, the ``mmcompress sparsify``
flags and ``config()``, so ``sparsify``, ``compress --recipe`` and ``mmcompress sparsify`` refuse the
same values with the same message.  ``sparsity`` is every method's target model-level sparsity,
checked by :data:`~mmcompress.sparse.topk.LEVEL` (the one range check of a sparsity level).  A method's
calibration is an engine method (:meth:`SparseMethod.layer_method`) that observes through the layer
context and changes each layer once its observers have seen it, so ``sparsify`` is one walk and a
recipe composes it with the quantization steps in one walk (:class:`mmcompress.engine.Sequence`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import options as opt
from ..topk import LEVEL

PREFILL = opt.choice("all", "none", "last_half")


@dataclass(frozen=True)
class SparseOptions(opt.Options):
    """The options every sparsity method takes."""

    sparsity: float = opt.option(0.4, LEVEL, "target model-level sparsity in [0, 1) (parameter-weighted over "
                                             "q,k,v,o,gate,up,down)", required=True)
    prefill: str = opt.option("all", PREFILL, "which prompt tokens are sparsified: all (paper protocol), none "
                                              "(dense prefill), last_half (TEAL's protocol)")


class SparseMethod:
    """A sparsity method: ``Options``, then :meth:`apply` on a model."""

    name = "sparse"
    Options: type[SparseOptions] = SparseOptions
    rotating = False  # transforms whole layers: the adapter's ``sparsity_blocker`` applies

    def __init__(self, **options):
        self.options = self.Options.make(options, self.name)
        self.sparsity = float(self.options.sparsity)

    def config(self) -> dict:
        """The method and every option."""
        return {"method": self.name, **self.options.to_json()}

    def kwargs(self) -> dict:
        """The options but ``sparsity``, as keyword arguments of the method's function."""
        return {k: v for k, v in self.options.values().items() if k != "sparsity"}

    def layer_method(self):
        """This method as an engine method (:class:`mmcompress.engine.Method`) that sparsifies the model in
        one layer-by-layer walk, alone or as a step of a recipe's walk (:class:`mmcompress.engine.Sequence`),
        with a ``description()`` once the walk is done."""
        raise NotImplementedError

    def apply(self, model, adapter, samples, *, device="cpu", progress=True, checkpoint_dir=None,
              resume: bool = False) -> dict:
        """Sparsify ``model`` in place; returns the description saved as ``mmcompress.json``'s ``method``.
        A streamed model (:mod:`mmcompress.streaming`) needs ``checkpoint_dir``; ``resume``: continue the walk
        checkpointed there (the engine's fingerprinted resume)."""
        from ...engine import run_layerwise

        walk = self.layer_method()
        run_layerwise(model, adapter, walk, samples, device=device, progress=progress, checkpoint_dir=checkpoint_dir,
                      resume=resume)
        return walk.description()
