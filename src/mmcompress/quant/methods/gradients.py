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

The ``loss_weights`` option of MASQuant and MBQ (one definition, :func:`resolve_loss_weights`): ``auto``
(the ratios above, measured when the calibration set has image or audio tokens), a preset of
:data:`LOSS_WEIGHT_PRESETS`, or ``{modality: λ}``; text is 1 unless given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...models.modality import (AUDIO, IMAGE, IMAGE_SPANS, MODALITY_NAMES, TEXT, input_modality_ids,
                                method_modalities, modality_ids, with_image_spans)

# λ per modality.  "scripted" is what every MASQuant reference script uses (1 : 1 : 0.5 for T : A : V);
# "auto" measures the gradient ratios on the calibration set (the paper's best setting).
LOSS_WEIGHT_PRESETS = {"scripted": {IMAGE: 0.5, AUDIO: 1.0}, "uniform": {IMAGE: 1.0, AUDIO: 1.0},
                       "omni-3b": {IMAGE: 0.15, AUDIO: 0.55}, "vl-3b": {IMAGE: 0.126, AUDIO: 1.0}}
LOSS_WEIGHTS_HELP = ("modality loss weights λ: auto (gradient ratios), " + ", ".join(LOSS_WEIGHT_PRESETS)
                     + ", or modality=weight pairs (image=0.15,audio=0.55)")
_MODALITY_KEYS = {"text": TEXT, "image": IMAGE, "vision": IMAGE, "audio": AUDIO}


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


# -- the loss_weights option ---------------------------------------------------------------------------


def modality_id(key) -> int:
    """The modality id of a loss-weight key (``text``, ``image`` / ``vision``, ``audio``, or an id)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if key not in _MODALITY_KEYS:
        raise ValueError(f"unknown modality {key!r} in loss weights")
    return _MODALITY_KEYS[key]


def check_loss_weights(v):
    """``auto``, a preset name, or ``{modality: weight}`` with finite weights >= 0 (keys: modality names)."""
    if isinstance(v, str) and (v == "auto" or v in LOSS_WEIGHT_PRESETS):
        return v
    if isinstance(v, dict) and v:
        for k, w in v.items():
            modality_id(k)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"must give finite weights >= 0, got {k}={w!r}")
        return {MODALITY_NAMES[modality_id(k)]: w for k, w in v.items()}
    raise ValueError(f"must be auto, {', '.join(LOSS_WEIGHT_PRESETS)} or modality=weight pairs, got {v!r}")


def parse_loss_weights(text: str):
    """The flag's text: a name, or ``image=0.15,audio=0.55``."""
    if "=" not in text:
        return text
    try:
        return {k.strip(): float(w) for k, w in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"expected e.g. image=0.15,audio=0.55, got {text!r}") from None


def modalities_present(samples, adapter) -> list[int]:
    """The modalities (text, image, audio) with tokens in ``samples`` (placeholder ids and image spans)."""
    present = set()
    for s in samples or []:
        present |= set(input_modality_ids(s, adapter.modality_token_ids, decode=False).unique().tolist())
    return sorted(m for m in present if m in (TEXT, IMAGE, AUDIO))


def probes_gradients(spec, adapter) -> bool:
    """Whether :func:`resolve_loss_weights` may run the gradient probe, a backward pass through the whole
    model (``auto`` on a model whose image/audio positions can be told from its inputs)."""
    return spec == "auto" and adapter.routed


def resolve_loss_weights(spec, model, adapter, samples, probe_samples: int) -> tuple[dict[int, float], dict | None]:
    """``({modality: λ}, ratios)`` for the option value ``spec`` (checked by :func:`check_loss_weights`):
    text at 1 unless ``spec`` gives it; ``auto`` measures :func:`modality_gradient_ratios` on the first
    ``probe_samples`` samples when they have image or audio tokens (``ratios``; else ``None`` and text
    alone).  A modality without a weight is the caller's to fill."""
    if isinstance(spec, dict):
        return {TEXT: 1.0, **{modality_id(k): float(v) for k, v in spec.items()}}, None
    if spec in LOSS_WEIGHT_PRESETS:
        return {TEXT: 1.0, **LOSS_WEIGHT_PRESETS[spec]}, None
    if spec != "auto":
        raise ValueError(f"loss_weights must be auto, {', '.join(LOSS_WEIGHT_PRESETS)} or a dict, got {spec!r}")
    if not probes_gradients(spec, adapter) or modalities_present(samples, adapter) in ([], [TEXT]):
        return {TEXT: 1.0}, None
    ratios = modality_gradient_ratios(model, adapter, list(samples)[:probe_samples])
    return {TEXT: 1.0, **ratios}, ratios
