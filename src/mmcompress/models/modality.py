"""Modality is data, not control flow.

Every token of a (possibly multimodal) input gets one integer modality id, built once from
``input_ids`` and the placeholder token ids the model's processor expands:

* ``TEXT = 0``  every ordinary token, chat special tokens and the image/audio begin/end markers;
* ``IMAGE = 1`` image placeholder (``<|image_pad|>``) positions, overwritten by vision features;
* ``AUDIO = 2`` audio placeholder (``<|AUDIO|>``) positions, overwritten by audio features;
* ``VIDEO = 3`` video placeholder positions.  MASQuant's reference counts video as text; methods map
  it with :func:`method_modalities`.

Decode steps (sequence length 1) and text-only inputs are all text.  Models that mark images by
token spans instead of a placeholder id (MiniCPM-V 2.x: ``image_bound``, per sample ``[n, 2]`` spans
``[start, end)``) get their image positions from those spans (:func:`input_modality_ids`).  The ids
of the sequence being processed are published in a context (:func:`modality_context`) that
modality-aware modules read (:func:`current_modality_ids`), so no model code has to thread an extra
argument through.
"""

from __future__ import annotations

import contextlib
import threading

import torch

TEXT, IMAGE, AUDIO, VIDEO = 0, 1, 2, 3

#: Qwen2.5-VL / Qwen2.5-Omni placeholder and marker tokens, by the tokenizer role that names them
QWEN_MM_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
MODALITY_NAMES = {TEXT: "text", IMAGE: "image", AUDIO: "audio", VIDEO: "video"}
NAME_TO_ID = {v: k for k, v in MODALITY_NAMES.items()}


def modality_ids(input_ids: torch.Tensor, token_ids: dict[str, int], *, decode: bool | None = None) -> torch.Tensor:
    """``[B, L]`` int8 modality ids from ``input_ids`` and ``{"image": id, "audio": id, ...}``.

    A sequence of length 1 (a decode step) or ``decode=True`` gives all text.
    """
    ids = torch.zeros(input_ids.shape, dtype=torch.int8, device=input_ids.device)
    if decode or (decode is None and input_ids.shape[-1] == 1):
        return ids
    for name, tok in token_ids.items():
        ids[input_ids == tok] = NAME_TO_ID[name]
    return ids


IMAGE_SPANS = "image_bound"
PENDING = "_mmcompress_pending_ids"  # modality ids a model's own embedding step leaves on the routed module


def input_modality_ids(inputs: dict, token_ids: dict[str, int], *, decode: bool | None = None) -> torch.Tensor:
    """:func:`modality_ids` of one model call's inputs, plus the image spans ``inputs["image_bound"]``
    where the inputs carry them (:func:`with_image_spans`)."""
    input_ids = inputs["input_ids"]
    ids = modality_ids(input_ids, token_ids, decode=decode)
    if decode or (decode is None and input_ids.shape[-1] == 1):
        return ids
    return with_image_spans(ids, inputs.get(IMAGE_SPANS))


def with_image_spans(ids: torch.Tensor, spans) -> torch.Tensor:
    """Mark the ``[start, end)`` spans of ``spans`` (per sample an ``[n, 2]`` tensor, or ``None``) as image."""
    if spans is None:
        return ids
    if len(spans) != ids.shape[0]:
        raise ValueError(f"{IMAGE_SPANS} has {len(spans)} entries for a batch of {ids.shape[0]}")
    for b, bounds in enumerate(spans):
        for start, end in torch.as_tensor(bounds).reshape(-1, 2).tolist():
            if not 0 <= start <= end <= ids.shape[-1]:
                raise ValueError(f"{IMAGE_SPANS} span [{start}, {end}) is outside a sequence of {ids.shape[-1]} tokens")
            ids[b, start:end] = IMAGE
    return ids


def masks(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean masks per modality name from modality ids."""
    return {name: ids == mid for mid, name in MODALITY_NAMES.items()}


def method_modalities(ids: torch.Tensor, video_as: int = TEXT) -> torch.Tensor:
    """Map video tokens to ``video_as`` (text by default, as the MASQuant reference does)."""
    if video_as == VIDEO:
        return ids
    out = ids.clone()
    out[ids == VIDEO] = video_as
    return out


def token_counts(ids: torch.Tensor) -> dict[str, int]:
    return {name: int((ids == mid).sum()) for mid, name in MODALITY_NAMES.items()}


_state = threading.local()


def current_modality_ids() -> torch.Tensor | None:
    """The modality ids of the sequence now running through the model, or ``None`` (all text)."""
    return getattr(_state, "ids", None)


def ids_of_tokens(x: torch.Tensor, sequence_ids: torch.Tensor) -> torch.Tensor:
    """The modality ids of the tokens in a module input ``x [..., d]``: the current ids when they
    match ``x``'s tokens (a caller may have narrowed them to the tokens it passed on, in their order:
    an MoE expert sees only the tokens routed to it, :class:`~.moe.ExpertLinears`), else
    ``sequence_ids`` (the whole sequence's)."""
    ids = current_modality_ids()
    if ids is not None and ids.numel() == x.numel() // max(1, x.shape[-1]):
        return ids
    return sequence_ids


@contextlib.contextmanager
def modality_context(ids: torch.Tensor | None):
    prev = getattr(_state, "ids", None)
    _state.ids = ids
    try:
        yield
    finally:
        _state.ids = prev


class ModalityRouter:
    """Forward pre-hook on a whole model that publishes modality ids of its ``input_ids`` (or, for a
    prefill on ``inputs_embeds``, the ids the model's own embedding step left on the module: ``PENDING``).

    Installed by :func:`install_router` on compressed multimodal models so that evaluation and
    generation route tokens without any change to the modelling code.  Generation's decode steps
    carry one new token, hence all text.
    """

    def __init__(self, token_ids: dict[str, int]):
        self.token_ids = dict(token_ids)

    def pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        pending = module.__dict__.pop(PENDING, None)  # left by the model's own embedding step (MiniCPM-V 2.x)
        ids = None
        if isinstance(embeds, torch.Tensor) and embeds.dim() == 3 and (
                not isinstance(input_ids, torch.Tensor) or input_ids.shape[-1] != embeds.shape[1]):
            if pending is not None and tuple(pending.shape) == tuple(embeds.shape[:2]) and embeds.shape[1] > 1:
                ids = pending.to(embeds.device)  # a prefill on embeddings: the ids of what was embedded
        elif isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            ids = modality_ids(input_ids, self.token_ids)
        if not hasattr(_state, "saved"):
            _state.saved = []
        _state.saved.append(getattr(_state, "ids", None))  # restored by post_hook (nested calls keep theirs)
        _state.ids = ids
        return None

    def post_hook(self, module, args, kwargs, output):
        saved = getattr(_state, "saved", None)
        _state.ids = saved.pop() if saved else None
        return None


def install_router(model: torch.nn.Module, token_ids: dict[str, int]):
    """Install a :class:`ModalityRouter` on ``model`` (idempotent); returns the hook handles."""
    if getattr(model, "_mmcompress_router", None) is not None:
        return model._mmcompress_router
    router = ModalityRouter(token_ids)
    handles = (
        model.register_forward_pre_hook(router.pre_hook, with_kwargs=True),
        model.register_forward_hook(router.post_hook, with_kwargs=True),
    )
    model._mmcompress_router = handles
    return handles
