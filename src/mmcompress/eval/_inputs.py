"""Shared by the multimodal metrics: the model's own prompt, and processor outputs moved onto the model."""

from __future__ import annotations

import json
from pathlib import Path

# processor outputs that are features (not ids or grids): cast to the model's floating dtype
_FEATURE_KEYS = ("pixel_values", "input_features")


def testbed_prompt(model, modality: str, default: str) -> str:
    """The ``modality`` prompt a testbed model was trained with (``mm_testbed.json`` next to its weights),
    else ``default``."""
    src = getattr(model, "_mmcompress_source", None)
    if src and (Path(src) / "mm_testbed.json").is_file():
        return json.loads((Path(src) / "mm_testbed.json").read_text()).get("prompts", {}).get(modality, default)
    return default


def to_model(model, inputs: dict) -> dict:
    """Processor outputs on the model's device; pixel and audio features in its floating dtype
    (float32 when its first parameter is not floating, e.g. integer codes)."""
    import torch

    first = next(model.parameters(), None)
    dev = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.dtype.is_floating_point else torch.float32
    inputs = {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in inputs.items()}
    for key in _FEATURE_KEYS:
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    return inputs
