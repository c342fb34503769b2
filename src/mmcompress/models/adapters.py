"""Model knowledge in one place.

An adapter tells the compression methods, for one architecture family, where the decoder layers
are, which normalisation feeds which linears, where the embedding and the head are (and whether
they are tied), and which token ids mark image, video and audio positions. Methods never look at
``model_type``: they ask the adapter.

Linear groups (``LinearGroup``) follow the data flow of a pre-norm decoder layer::

    attn_in : input_layernorm          -> q_proj, k_proj, v_proj
    attn_out: v_proj (producer)        -> o_proj
    mlp_in  : post_attention_layernorm -> gate_proj, up_proj      (Gemma3: pre_feedforward_layernorm)
    mlp_out : up_proj (producer)       -> down_proj

A smoothing vector ``s`` for a group divides the group's input and multiplies the columns of every
reader: it can be folded into the producer (a norm's scale or the output rows of a linear) when the
structure allows it (``LinearGroup.foldable``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass
class LinearGroup:
    """Linears of one decoder layer that read the same input tensor.

    ``producer`` is the module that writes that input (a norm or a linear) or ``None`` if the input
    cannot be rescaled offline; ``producer_kind`` is ``"norm"`` or ``"linear"``.
    """

    name: str  # attn_in | attn_out | mlp_in | mlp_out
    readers: list[str]  # paths relative to the decoder layer
    producer: str | None
    producer_kind: str | None

    def modules(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.get_submodule(p) for p in self.readers]


@dataclass
class ModelAdapter:
    """Architecture knowledge for one loaded model (see module docstring)."""

    model: nn.Module
    family: str
    lm_path: str  # path of the text decoder model (holds embed_tokens, layers, norm)
    groups: list[LinearGroup]
    modality_token_ids: dict[str, int] = field(default_factory=dict)
    norm_offset: float = 0.0  # Gemma RMSNorm computes x * (1 + weight)
    multimodal: bool = False

    # -- structure ---------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.get_submodule(self.lm_path)

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight or (
            self.lm_head.weight.data_ptr() == self.embed_tokens.weight.data_ptr()
        )

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    def linear_names(self) -> list[str]:
        """All quantizable linear paths inside one decoder layer, in data-flow order."""
        return [r for g in self.groups for r in g.readers]

    def layer_prefix(self, index: int) -> str:
        return f"{self.lm_path}.layers.{index}"

    # -- norm scales (Gemma stores weight - 1) ---------------------------------------------------
    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """The effective multiplicative scale gamma of an RMSNorm."""
        return norm.weight.data.double() + self.norm_offset

    def set_norm_scale(self, norm: nn.Module, gamma: torch.Tensor) -> None:
        norm.weight.data.copy_((gamma - self.norm_offset).to(norm.weight.dtype))


_LLAMA_GROUPS = [
    LinearGroup("attn_in", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "input_layernorm", "norm"),
    LinearGroup("attn_out", ["self_attn.o_proj"], "self_attn.v_proj", "linear"),
    LinearGroup("mlp_in", ["mlp.gate_proj", "mlp.up_proj"], "post_attention_layernorm", "norm"),
    LinearGroup("mlp_out", ["mlp.down_proj"], "mlp.up_proj", "linear"),
]
_GEMMA3_GROUPS = [
    LinearGroup("attn_in", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "input_layernorm", "norm"),
    LinearGroup("attn_out", ["self_attn.o_proj"], "self_attn.v_proj", "linear"),
    LinearGroup("mlp_in", ["mlp.gate_proj", "mlp.up_proj"], "pre_feedforward_layernorm", "norm"),
    LinearGroup("mlp_out", ["mlp.down_proj"], "mlp.up_proj", "linear"),
]


@dataclass(frozen=True)
class _Family:
    family: str
    lm_path: str | tuple  # candidates, first match wins (layouts differ across transformers versions)
    groups: list
    token_attrs: dict  # modality -> config attribute holding the placeholder id
    norm_offset: float = 0.0
    multimodal: bool = False


# model_type -> family description.  Keys are transformers `config.model_type` values.
FAMILIES: dict[str, _Family] = {
    "llama": _Family("llama", "model", _LLAMA_GROUPS, {}),
    "mistral": _Family("mistral", "model", _LLAMA_GROUPS, {}),
    "qwen2": _Family("qwen2", "model", _LLAMA_GROUPS, {}),
    "gemma3_text": _Family("gemma3", "model", _GEMMA3_GROUPS, {}, norm_offset=1.0),
    "qwen2_5_vl": _Family(
        "qwen2_5_vl", "model.language_model", _LLAMA_GROUPS,
        {"image": "image_token_id", "video": "video_token_id"}, multimodal=True,
    ),
    "qwen2_5_omni_thinker": _Family(  # transformers >= 5.2x nests the text model; 5.17 puts it at `model`
        "qwen2_5_omni_thinker", ("model.language_model", "model"), _LLAMA_GROUPS,
        {"image": "image_token_index", "video": "video_token_index", "audio": "audio_token_index"},
        multimodal=True,
    ),
}

UNSUPPORTED_NOTES = {
    "minicpmv4_6": "MiniCPM-V 4.6 uses a Qwen3.5 hybrid (Gated-DeltaNet) text backbone with fused "
    "linear-attention projections that no adapter describes yet",
    "minicpmv4_7": "MiniCPM-V 4.7 is not supported yet",
    "gemma3": "Gemma3 multimodal is not supported; the text model (Gemma3ForCausalLM) is",
    "qwen2_5_omni": "use the thinker (Qwen2_5OmniThinkerForConditionalGeneration); the talker is not quantized",
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the adapter for ``model`` or raise :class:`UnsupportedModelError`."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is None:
        note = UNSUPPORTED_NOTES.get(model_type)
        msg = f"unsupported architecture {model_type!r}"
        if note:
            msg += f" ({note})"
        msg += f"; supported model types: {', '.join(supported_model_types())}"
        raise UnsupportedModelError(msg)
    token_ids = {}
    for modality, attr in fam.token_attrs.items():
        value = getattr(config, attr, None)
        if value is not None:
            token_ids[modality] = int(value)
    candidates = (fam.lm_path,) if isinstance(fam.lm_path, str) else tuple(fam.lm_path)
    lm_path = next((c for c in candidates if _has_layers(model, c)), candidates[0])
    adapter = ModelAdapter(
        model=model, family=fam.family, lm_path=lm_path, groups=list(fam.groups),
        modality_token_ids=token_ids, norm_offset=fam.norm_offset, multimodal=fam.multimodal,
    )
    try:
        adapter.layers  # noqa: B018 - validate the layout
    except AttributeError as e:  # pragma: no cover - a config/model mismatch
        raise UnsupportedModelError(f"model of type {model_type!r} has no decoder layers at "
                                    f"{' or '.join(c + '.layers' for c in candidates)}") from e
    return adapter


def _has_layers(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(getattr(model.get_submodule(path), "layers", None), nn.ModuleList)
    except AttributeError:
        return False
