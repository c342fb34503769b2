"""MiniCPM-V 2.x (MiniCPM-Llama3-V-2.5, MiniCPM-V 2.6): remote code with its own calling convention.

Their ``modeling_minicpmv.py`` ships in the model directory (mmcompress imports it only with
``--trust-remote-code``).  ``MiniCPMV`` holds the language model in ``llm`` (Llama-3 / Qwen2), a vision
tower ``vpm`` and a ``resampler``; ``forward(data)`` takes one dict::

    data = {"input_ids": [B, L], "pixel_values": per sample a list of images, "tgt_sizes": per sample
            [n, 2] patch grids, "image_bound": per sample [n, 2] token spans [start, end), "position_ids": [B, L]}

embeds the tokens and writes each image's resampled features over its ``image_bound`` span.  The
image positions are therefore the spans, not a placeholder id in the config: the modality ids read
them (:func:`~.modality.input_modality_ids`).

:func:`data_call` is the forward pre-hook the adapter installs so that every mmcompress tool calls the
model as it calls any other, ``model(input_ids=..., pixel_values=..., image_bound=..., use_cache=False)``
(text-only calibration windows, evaluation); a call already in the model's own form passes through.

Every path into the language model, ``forward`` and the model's own ``generate`` / ``chat``, embeds
through ``get_vllm_embedding(data)`` and then calls ``llm`` with ``inputs_embeds``.  :func:`install` wraps
that method on the instance so that it leaves the modality ids of ``data`` on ``llm``, where the
modality router (installed on ``llm`` for this family) picks them up for the prefill; decode steps
carry one token id each, hence text.
"""

from __future__ import annotations

import types

import torch

DATA_KEYS = ("input_ids", "pixel_values", "tgt_sizes", "image_bound", "position_ids")


def to_data(kwargs: dict) -> dict:
    """The ``data`` dict of a keyword call (popped from ``kwargs``); missing image fields mean no image."""
    input_ids = kwargs.pop("input_ids")
    batch, length = input_ids.shape
    data = {k: kwargs.pop(k, None) for k in DATA_KEYS}
    data["input_ids"] = input_ids
    if data["pixel_values"] is None:
        data["pixel_values"] = [[] for _ in range(batch)]
    if data["tgt_sizes"] is None:
        data["tgt_sizes"] = [torch.zeros(0, 2, dtype=torch.int32) for _ in range(batch)]
    if data["image_bound"] is None:
        data["image_bound"] = [torch.zeros(0, 2, dtype=torch.long) for _ in range(batch)]
    if data["position_ids"] is None:
        data["position_ids"] = torch.arange(length, device=input_ids.device).expand(batch, length)
    return data


def data_call(module, args, kwargs):
    """Forward pre-hook: ``model(input_ids=..., ...)`` -> ``model(data, ...)``."""
    if args or "data" in kwargs or kwargs.get("input_ids") is None:
        return None
    kwargs = dict(kwargs)
    return (to_data(kwargs),), kwargs


def _routed_embedding(self, data):
    """``get_vllm_embedding`` that also leaves the modality ids of ``data`` for the router on ``llm``."""
    from .modality import PENDING, input_modality_ids

    if isinstance(data, dict) and isinstance(data.get("input_ids"), torch.Tensor):
        self.llm.__dict__[PENDING] = input_modality_ids(data, {}, decode=False)
    return type(self).get_vllm_embedding(self, data)


def install(model) -> None:
    """The calling convention (:func:`data_call`) and the routed ``get_vllm_embedding`` on ``model``."""
    model._mmcompress_call_convention = model.register_forward_pre_hook(data_call, with_kwargs=True)
    if callable(getattr(type(model), "get_vllm_embedding", None)):  # bound to the instance: deepcopy re-binds it
        model.get_vllm_embedding = types.MethodType(_routed_embedding, model)
