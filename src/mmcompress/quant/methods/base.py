"""Shared machinery of the quantization methods: replacing a layer's linears, smoothing folds."""

from __future__ import annotations

import torch
from torch import nn

from ... import options as opt
from ...engine import Method
from ...models.adapters import LinearGroup, ModelAdapter
from ..linear import QuantLinear
from ..quantizer import QuantScheme


class QuantMethod(Method):
    """A quantization method: the scheme, its options, plus the step that subclasses fill in.

    ``Options``: the method's options dataclass (:class:`mmcompress.options.Options`); the CLI flags,
    recipe keys, ``config()`` (the artifact's JSON and the resume fingerprint) come from its fields.
    Each option is also an attribute of the method (``self.alpha``); ``self.options`` is the instance."""

    Options: type[opt.Options] = opt.NoOptions

    def __init__(self, scheme: QuantScheme, **options):
        self.scheme = scheme
        self.options = self.Options.make(options, self.name)
        vars(self).update(self.options.values())

    def config(self) -> dict:
        """The method, the scheme and every option (so none can be left out of the JSON or the fingerprint)."""
        return {"method": self.name, "scheme": self.scheme.to_dict(), **self.options.to_json()}


def quantize_layer_linears(layer: nn.Module, adapter: ModelAdapter, scheme: QuantScheme, *, pack: bool = True) -> dict[str, QuantLinear]:
    """Swap every decoder linear of ``layer`` for a :class:`QuantLinear` (weights as they are now)."""
    out = {}
    for path in adapter.linear_names():
        mod = layer.get_submodule(path)
        q = mod if isinstance(mod, QuantLinear) else QuantLinear.from_linear(mod, scheme)
        layer.set_submodule(path, q)
        if pack:
            q.pack()
        out[path] = q
    return out


def weight_column_absmax(modules: list[nn.Module]) -> torch.Tensor:
    """``max_i |W_ij|`` over the output rows of all readers of a group (per input channel j)."""
    return torch.stack([m.weight.detach().abs().amax(0).double() for m in modules]).amax(0)


def smoothing_foldable(layer: nn.Module, group: LinearGroup, config) -> bool:
    """Can the division ``x / s`` of this group be folded offline into its producer?"""
    if group.producer is None:
        return False
    if any(getattr(m, "input_sparsifier", None) is not None or hasattr(m, "sparsify") for m in group.modules(layer)):
        return False  # Top-K must see the unscaled input: keep the division at run time
    if group.producer_kind == "norm":
        return True
    producer = layer.get_submodule(group.producer)
    readers = group.modules(layer)
    if producer.weight.shape[0] != readers[0].weight.shape[1]:
        return False  # e.g. v_proj -> o_proj under grouped-query attention
    return True


@torch.no_grad()
def apply_smoothing(layer: nn.Module, adapter: ModelAdapter, group: LinearGroup, s: torch.Tensor) -> str:
    """Apply the equivalence ``X Wᵀ = (X / s)(W ⊙ s)ᵀ`` to one group (E1).

    The readers' columns are multiplied by ``s``.  The division is folded into the producer
    (a norm's γ, or the output rows and bias of the producing linear) when possible, and then the
    group's floating-point followers (an MoE router) get their columns multiplied by ``s`` too, so
    they read ``(x / s)(W_r ⊙ s)ᵀ = x W_rᵀ``; otherwise the readers become :class:`QuantLinear`
    modules that divide their input at run time (followers untouched).  Returns ``"folded"`` or
    ``"runtime"``.
    """
    readers = group.modules(layer)
    s = s.double().to(readers[0].weight.device)
    foldable = smoothing_foldable(layer, group, adapter.text_config)
    if foldable:
        producer = layer.get_submodule(group.producer)
        if group.producer_kind == "norm":
            adapter.set_norm_scale(producer, adapter.norm_scale(producer) / s)
        else:
            w = producer.weight
            w.data.copy_((w.data.double() / s[:, None]).to(w.dtype))
            if producer.bias is not None:
                producer.bias.data.copy_((producer.bias.data.double() / s).to(producer.bias.dtype))
        for path in group.followers:
            w = layer.get_submodule(path).weight
            w.data.copy_((w.data.double() * s[None, :].to(w.device)).to(w.dtype))
    for path, mod in zip(group.readers, readers):
        w = mod.weight
        w.data.copy_((w.data.double() * s[None, :]).to(w.dtype))
        if not foldable:
            if not isinstance(mod, QuantLinear):
                raise TypeError("run-time smoothing needs QuantLinear readers; quantize the layer first")
            if mod.input_smoothing is None:
                mod.input_smoothing = torch.ones(1, mod.in_features, device=w.device)
            mod.input_smoothing.mul_(s.to(mod.input_smoothing.dtype)[None, :])
    return "folded" if foldable else "runtime"
