"""Modality loss weights from gradients (MBQ, Li et al. CVPR 2025; MASQuant §6.5).

For decoder layer ℓ and modality m, ``g_m^ℓ`` is the mean absolute gradient of the next-token
cross-entropy (on text targets) with respect to the layer's output hidden states, averaged over the
tokens of modality m.  The loss weight of a modality is its largest ratio to text over the layers::

    λ_m = max_ℓ r_m^ℓ,     r_m^ℓ = mean_{t ∈ m} ĝ_t^ℓ / mean_{t ∈ T} ĝ_t^ℓ     over the samples that contain m,
    ĝ_t^ℓ = mean_d |∂L_n/∂h^ℓ_{t,d}| / c_n^ℓ,     c_n^ℓ = the mean of that over every token of t's sample n

A ratio of raw pools would not be a property of the modality: a token's gradient scales with its
sample's loss normalisation (1 / text targets for a per-sample mean) and with how many later targets
attend to it (a long text-only window gives its tokens larger gradients than a short caption does), so
text-only windows mixed into the calibration set would move λ although no image or audio token
changed.  Dividing each token by its own sample's mean gradient ``c_n`` removes that scale, and taking
both pools from the samples that contain m makes λ_m blind to text-only samples.  (A mean of
per-sample ratios would be invariant too, but biased upward by noisy denominators in short samples.)
Samples without a text target are skipped.

(the MASQuant reference found a constant equal to the maximum over layers better than per-layer
ratios).  The layer-wise ratios are also returned for reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...models.modality import IMAGE_SPANS, TEXT, method_modalities, modality_ids, with_image_spans


def modality_gradient_profile(model, adapter, samples) -> dict[int, list[float]]:
    """``{m: [r_m^ℓ for each layer ℓ]}`` over the given samples (see the module docstring)."""
    layers = adapter.layers
    n = len(layers)
    pooled: dict[int, torch.Tensor] = {}  # m -> [4, layers]: Σ ĝ over m, count of m, Σ ĝ over text, count of text
    state = {}

    def make_hook(i):
        def fwd(mod, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if h.requires_grad:
                h.register_hook(lambda g, i=i: _acc(i, g))
        return fwd

    def _acc(i, g):
        a = g.detach().abs().mean(-1).reshape(-1).double().cpu()  # per token
        c = a.mean()
        if c <= 0:
            return
        a = a / c
        text = state["masks"][TEXT]
        for m, sel in state["masks"].items():
            if m != TEXT:
                acc = pooled.setdefault(m, torch.zeros(4, n, dtype=torch.float64))
                acc[:, i] += torch.stack([a[sel].sum(), sel.sum(), a[text].sum(), text.sum()]).double()

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
                ids = with_image_spans(modality_ids(sample["input_ids"], adapter.modality_token_ids, decode=False),
                                       sample.get(IMAGE_SPANS)).reshape(-1)
                ids = method_modalities(ids)
                is_text = ids[1:] == TEXT
                present = [m for m in ids.unique().tolist() if m != TEXT]
                if not is_text.any() or not present:
                    continue  # no text target, or nothing to compare with text
                state["masks"] = {m: ids == m for m in [TEXT, *present]}
                out = model(**sample, use_cache=False)
                logits = out.logits[0, :-1].float()
                target = sample["input_ids"][0, 1:]
                F.cross_entropy(logits[is_text], target[is_text], reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    profile = {}
    for m, (g_m, n_m, g_t, n_t) in pooled.items():
        profile[m] = ((g_m / n_m.clamp(min=1)) / (g_t / n_t.clamp(min=1)).clamp(min=1e-30)).tolist()
    return profile


def modality_gradient_ratios(model, adapter, samples) -> dict[int, float]:
    """``{m: λ_m}`` with ``λ_m = max_ℓ g_m^ℓ / g_T^ℓ`` (text is 1)."""
    profile = modality_gradient_profile(model, adapter, samples)
    return {m: float(max(v)) for m, v in profile.items() if v}
