"""Modality loss weights from gradients (MBQ, Li et al. CVPR 2025; MASQuant §6.5).

For decoder layer ℓ and modality m, ``g_m^ℓ`` is the mean absolute gradient of the next-token
cross-entropy (on text targets) with respect to the layer's output hidden states, averaged over the
tokens of modality m.  The loss weight of a modality is its largest ratio to text over the layers::

    λ_m = max_ℓ g_m^ℓ / g_T^ℓ

(the MASQuant reference found a constant equal to the maximum over layers better than per-layer
ratios).  The layer-wise ratios are also returned for reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...models.modality import TEXT, VIDEO, modality_ids


def modality_gradient_profile(model, adapter, samples) -> dict[int, list[float]]:
    """``{m: [g_m^ℓ / g_T^ℓ for each layer ℓ]}`` over the given samples."""
    layers = adapter.layers
    n = len(layers)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    state = {}

    def make_hook(i):
        def fwd(mod, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if h.requires_grad:
                h.register_hook(lambda g, i=i: _acc(i, g))
        return fwd

    def _acc(i, g):
        ids = state["ids"]
        a = g.detach().abs().mean(-1).reshape(-1).double().cpu()  # per token
        for m in ids.unique().tolist():
            sel = ids == m
            sums.setdefault(m, torch.zeros(n, dtype=torch.float64))[i] += a[sel].sum()

    def make_input_grad(mod, args, kwargs):
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    handles.append(layers[0].register_forward_pre_hook(make_input_grad, with_kwargs=True))
    try:
        with torch.enable_grad():
            for sample in samples:
                ids = modality_ids(sample["input_ids"], adapter.modality_token_ids, decode=False).reshape(-1)
                ids = torch.where(ids == VIDEO, torch.full_like(ids, TEXT), ids)
                state["ids"] = ids
                for m in ids.unique().tolist():
                    counts[m] = counts.get(m, 0) + int((ids == m).sum())
                out = model(**sample, use_cache=False)
                logits = out.logits[0, :-1].float()
                target = sample["input_ids"][0, 1:]
                is_text = ids[1:] == TEXT
                if not is_text.any():
                    continue
                loss = F.cross_entropy(logits[is_text], target[is_text])
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    if TEXT not in sums:
        return {}
    g_text = sums[TEXT] / max(1, counts[TEXT])
    profile = {}
    for m, s in sums.items():
        if m == TEXT:
            continue
        g = s / max(1, counts[m])
        profile[m] = (g / g_text.clamp(min=1e-30)).tolist()
    return profile


def modality_gradient_ratios(model, adapter, samples) -> dict[int, float]:
    """``{m: λ_m}`` with ``λ_m = max_ℓ g_m^ℓ / g_T^ℓ`` (text is 1)."""
    profile = modality_gradient_profile(model, adapter, samples)
    return {m: float(max(v)) for m, v in profile.items() if v}
