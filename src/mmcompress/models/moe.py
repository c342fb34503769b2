"""Mixture-of-experts decoder layers (Qwen3-Omni-MoE thinker): the fused experts as per-expert linears.

transformers 5.x stores the experts of a sparse MoE block as two fused 3-D parameters
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``) and runs them in a loop
over the experts hit by the router (``mlp.gate``, top-k of a softmax over ``x W_rᵀ``)::

    y_t = Σ_{e ∈ topk(t)} w_te · down_e(act(gate_e(x_t)) ⊙ up_e(x_t))

:func:`unfuse_experts` replaces each fused module by :class:`ExpertLinears`: one ``nn.Linear`` per expert
and projection (``mlp.experts.{e}.gate_proj | up_proj | down_proj``, the per-expert layout of
Qwen3-MoE / Mixtral checkpoints and of compressed-tensors MoE checkpoints), with the same routing loop.
The weights are copied, not changed: the surgery preserves the model's outputs (up to the summation
order of the split ``gate_up`` matmul).  Every compression method then sees ordinary linears:

* each expert's gate, up and down is quantized as its own weight, with its own per-output-channel
  (or group) step sizes; the router stays in floating point (a top-k decision is discontinuous);
* inside the loop the modality ids of the sequence are narrowed to the tokens routed to the expert
  (:func:`~.modality.modality_context`), so per-modality smoothing rows (MASQuant), per-token
  activation quantization and calibration statistics all act on *the tokens each expert sees*.

:class:`ExpertLinears` is a registered module (:mod:`mmcompress.specs`): its spec carries the specs of
its children, so an artifact whose experts are quantized loads into the fused model class.
"""

from __future__ import annotations

import torch
from torch import nn

from ..specs import module_class, register_quant_module
from .modality import current_modality_ids, modality_context

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) ⊙ up(x))``."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear_spec(mod: nn.Module) -> dict:
    if hasattr(mod, "spec"):
        return mod.spec()
    return {"class": "Linear", "in_features": mod.in_features, "out_features": mod.out_features,
            "bias": mod.bias is not None, "dtype": str(mod.weight.dtype).replace("torch.", "")}


def _linear_from_spec(spec: dict, device=None) -> nn.Module:
    if spec["class"] == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], device=device,
                         dtype=getattr(torch, spec.get("dtype", "float32")))
    return module_class(spec["class"]).from_spec(spec, device=device)


@register_quant_module
class ExpertLinears(nn.ModuleList):
    """The experts of one sparse MoE block as per-expert linears; ``forward`` is the fused module's."""

    def __init__(self, experts: list[ExpertMLP], hidden_act: str):
        super().__init__(experts)
        self.hidden_act = hidden_act

    @property
    def num_experts(self) -> int:
        return len(self)

    @classmethod
    def from_fused(cls, fused: nn.Module, hidden_act: str) -> "ExpertLinears":
        """Split ``gate_up_proj [E, 2I, H]`` (gate rows first, as ``.chunk(2)`` reads them) and ``down_proj``."""
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        n, two_i, hidden = gate_up.shape
        inter = two_i // 2
        experts = []
        for e in range(n):
            lin = [nn.Linear(hidden, inter, bias=False, device=gate_up.device, dtype=gate_up.dtype),
                   nn.Linear(hidden, inter, bias=False, device=gate_up.device, dtype=gate_up.dtype),
                   nn.Linear(inter, hidden, bias=False, device=down.device, dtype=down.dtype)]
            lin[0].weight.data.copy_(gate_up[e, :inter])
            lin[1].weight.data.copy_(gate_up[e, inter:])
            lin[2].weight.data.copy_(down[e])
            experts.append(ExpertMLP(*lin, _activation(hidden_act)))
        return cls(experts, hidden_act)

    def spec(self) -> dict:
        per_expert = [{p: _linear_spec(getattr(ex, p)) for p in PROJECTIONS} for ex in self]
        same = all(s == per_expert[0] for s in per_expert)
        return {"class": type(self).__name__, "hidden_act": self.hidden_act, "num_experts": len(per_expert),
                **({"expert": per_expert[0]} if same else {"experts": per_expert})}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "ExpertLinears":
        n = int(spec["num_experts"])
        per_expert = [spec["expert"]] * n if "expert" in spec else spec["experts"]
        if len(per_expert) != n:
            raise ValueError(f"ExpertLinears spec: {len(per_expert)} expert specs for num_experts={n}")
        experts = [ExpertMLP(*(_linear_from_spec(s[p], device) for p in PROJECTIONS), _activation(spec["hidden_act"]))
                   for s in per_expert]
        return cls(experts, spec["hidden_act"])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """``hidden_states [T, H]``, the router's ``top_k_index [T, k]`` and ``top_k_weights [T, k]``."""
        final = torch.zeros_like(hidden_states)
        ids = current_modality_ids()
        if ids is not None and ids.numel() == hidden_states.shape[0]:
            ids = ids.reshape(-1).to(hidden_states.device)
        else:
            ids = None  # decode steps and text-only inputs: all text
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == len(self):
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            with modality_context(None if ids is None else ids[token_idx]):
                y = self[e](hidden_states[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, y.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        return f"experts={len(self)}, hidden_act={self.hidden_act}"


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def is_fused_experts(mod: nn.Module | None) -> bool:
    w = getattr(mod, "gate_up_proj", None)
    return isinstance(w, nn.Parameter) and w.dim() == 3


def fused_experts(layers: nn.ModuleList) -> list[nn.Module]:
    """The sparse blocks of ``layers`` whose experts are still fused."""
    return [layer.mlp for layer in layers if is_fused_experts(getattr(getattr(layer, "mlp", None), "experts", None))]


def unfuse_experts(layers: nn.ModuleList, hidden_act: str) -> int:
    """Replace every fused ``mlp.experts`` of ``layers`` by :class:`ExpertLinears` (idempotent); returns
    how many were replaced.  The weights must be materialised (the adapter refuses the meta device:
    streamed and data-free runs read the checkpoint by tensor name, and it stores the experts fused)."""
    blocks = fused_experts(layers)
    for mlp in blocks:
        mlp.experts = ExpertLinears.from_fused(mlp.experts, hidden_act)
    return len(blocks)
