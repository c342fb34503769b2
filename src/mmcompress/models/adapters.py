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
structure allows it (:func:`~mmcompress.quant.methods.base.smoothing_foldable`).

A family is declared in :data:`FAMILIES` in a few lines (:class:`Family`): where the text decoder
is, the groups of each *kind* of decoder layer (:class:`LayerKind`; hybrid models such as Qwen3.5 mix
full-attention and linear-attention layers, told apart by ``config.layer_types``), the linears a
layer kind deliberately leaves in floating point (with the reason), the norm convention, the config
keys of the modality placeholder ids, and why a compression mode cannot handle the family.  A family
whose model takes its inputs in another form (MiniCPM-V 2.x: one ``data`` dict, image spans in
``image_bound``) declares a *calling convention*, a forward pre-hook that :func:`get_adapter` installs so
that every tool can call the model with the usual keyword inputs (:mod:`.minicpmv`).  Methods
that work one decoder layer at a time get a per-layer view (:meth:`ModelAdapter.at_layer`), so the
same method code walks every kind of layer.  A mixture-of-experts family (``Family.moe``) has its fused
experts split into per-expert linears by :func:`get_adapter` (:mod:`.moe`, docs/moe.md); its groups
carry a floating-point *follower* (the router) and one ``mlp_out.<expert>`` group per expert.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

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

    name: str  # the role attn_in | attn_out | mlp_in | mlp_out, suffixed ".<expert>" for one expert's group
    readers: list[str]  # paths relative to the decoder layer
    producer: str | None
    producer_kind: str | None
    # modules that read the same input but stay in floating point (an MoE router): a smoothing vector
    # folded into the producer multiplies their weight columns too, so their outputs are unchanged
    followers: tuple[str, ...] = ()
    tap: str | None = None  # the module whose input is this group's input on every token (default: readers[0])

    @property
    def role(self) -> str:
        """``attn_in | attn_out | mlp_in | mlp_out`` (methods choose groups by role)."""
        return self.name.split(".", 1)[0]

    def modules(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.get_submodule(p) for p in self.readers]

    def input_module(self, layer: nn.Module) -> nn.Module:
        """Where to observe the group's input (a forward pre-hook there sees every token that reaches
        the group; an expert's own linear sees only the tokens routed to it)."""
        return layer.get_submodule(self.tap or self.readers[0])


@dataclass(frozen=True)
class LayerKind:
    """The linear groups of one kind of decoder layer, and its linears that stay in floating point
    (relative path -> why).  Every ``nn.Linear`` of such a layer is in exactly one of the two."""

    groups: tuple[LinearGroup, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    def linear_names(self) -> list[str]:
        return [r for g in self.groups for r in g.readers]


@dataclass(frozen=True)
class ServingContainer:
    """The model a checkpoint of this family is served inside, where vLLM registers the family only as part
    of a larger model (vLLM 0.32 serves the Qwen2.5-Omni thinker only as ``Qwen2_5OmniForConditionalGeneration``:
    it reads ``config.thinker_config`` and ``thinker.``-prefixed tensor names).  A serving export nests the
    family's config under ``config_key`` of a ``model_type`` config (plus ``extra``), names it
    ``architecture`` and prefixes every tensor (and ``ignore`` entry) with ``prefix``."""

    model_type: str
    architecture: str
    config_key: str
    prefix: str
    extra: tuple = ()  # (key, value) pairs of the container config
    # (shard suffixes, fused suffix): linears vLLM fuses under a name its ``ignore`` matching does not resolve
    # to the shards, so an ``ignore`` list naming every shard also names the fused layer
    fused_ignore: tuple = ()


#: Qwen2.5-Omni without the talker: vLLM's Omni classes build only the thinker
QWEN2_5_OMNI_CONTAINER = ServingContainer("qwen2_5_omni", "Qwen2_5OmniForConditionalGeneration", "thinker_config",
                                          "thinker.", (("enable_audio_output", False),),
                                          # vLLM 0.32 fuses the vision tower's attn.q/k/v into attn.qkv, but its
                                          # compressed-tensors ignore matching looks up the fused mapping by the
                                          # last name component ("qkv", mapped as "attn.qkv"): unlisted, the
                                          # unquantized tower is built as W8A8 and computes NaN
                                          fused_ignore=((("attn.q", "attn.k", "attn.v"), "attn.qkv"),))


@dataclass
class ModelAdapter:
    """Architecture knowledge for one loaded model (see module docstring)."""

    model: nn.Module
    family: str
    lm_path: str  # path of the text decoder model (holds embed_tokens, layers, norm)
    kinds: list[LayerKind]  # per decoder layer
    modality_token_ids: dict[str, int] = field(default_factory=dict)
    norm_offset: float = 0.0  # Gemma / Qwen3.5 RMSNorm computes x * (1 + weight)
    embedding_writers: tuple[str, ...] = ()  # suffixes of linears that write into the input embeddings
    embedding_matrices: tuple[str, ...] = ()  # paths of parameters P whose features x @ P are written there
    merged_blocker: str | None = None  # why LaRoSA's merged mode cannot be used (None: it can)
    sparsity_blocker: str | None = None  # why LaRoSA and WINA cannot be applied at all (TEAL and CATS can)
    layer_index: int | None = None  # set on a per-layer view (:meth:`at_layer`)
    head_path: str = "lm_head"
    image_spans: bool = False  # image positions come from the inputs' ``image_bound`` spans (MiniCPM-V 2.x)
    router_path: str = ""  # the module the modality router sits on ("": the model)
    moe: bool = False  # sparse MoE blocks whose experts are per-expert linears (:mod:`.moe`)
    container: ServingContainer | None = None  # how serving exports wrap the checkpoint (None: as it is)

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
        return self.model.get_submodule(self.head_path)

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight or (
            self.lm_head.weight.data_ptr() == self.embed_tokens.weight.data_ptr()
        )

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def hybrid(self) -> bool:
        """Decoder layers of more than one kind (e.g. full and linear attention)."""
        return len({id(k) for k in self.kinds}) > 1

    @property
    def groups(self) -> list[LinearGroup]:
        """The linear groups of every decoder layer (of this layer, on a per-layer view)."""
        if self.hybrid:
            raise UnsupportedModelError(
                f"{self.family} mixes decoder layers of several kinds and this operation assumes one kind "
                "for all layers (use ModelAdapter.layer_groups(i) / at_layer(i))")
        return list(self.kinds[0].groups)

    def layer_groups(self, index: int) -> list[LinearGroup]:
        return list(self.kinds[index].groups)

    def skipped(self, index: int) -> dict[str, str]:
        """Linears of decoder layer ``index`` deliberately left in floating point (path -> why)."""
        return dict(self.kinds[index].skipped)

    def at_layer(self, index: int) -> ModelAdapter:
        """A view of this adapter whose ``groups`` / ``linear_names()`` are those of layer ``index``."""
        view = copy.copy(self)
        view.kinds = [self.kinds[index]] * len(self.kinds)
        view.layer_index = index
        return view

    def linear_names(self, index: int | None = None) -> list[str]:
        """All quantizable linear paths inside a decoder layer, in data-flow order."""
        if index is not None:
            return self.kinds[index].linear_names()
        return [r for g in self.groups for r in g.readers]

    def layer_prefix(self, index: int) -> str:
        return f"{self.lm_path}.layers.{index}"

    def residual_writers(self, index: int) -> list[str]:
        """Linears of decoder layer ``index`` that write into the residual stream (the readers of the
        ``attn_out`` and ``mlp_out`` groups: o_proj, down_proj, each expert's down_proj); under tensor
        parallelism they are the row-parallel ones."""
        return [r for g in self.kinds[index].groups if g.role in ("attn_out", "mlp_out") for r in g.readers]

    def mlp_activation(self, index: int) -> str:
        """Path of the gated MLP's activation module in decoder layer ``index`` (``act_fn`` beside the
        ``mlp_in`` readers, as every supported family names it)."""
        g = next(g for g in self.kinds[index].groups if g.role == "mlp_in")
        return g.readers[0].rpartition(".")[0] + ".act_fn"

    @property
    def routed(self) -> bool:
        """Image/audio positions can be told from the inputs (placeholder ids or image spans)."""
        return bool(self.modality_token_ids) or self.image_spans

    def install_router(self) -> None:
        """Route prefill tokens by modality on the compressed model (:class:`~.modality.ModalityRouter`; on
        ``router_path`` for a family whose language model is called with embeddings only)."""
        if self.routed:
            from .modality import install_router

            target = self.model.get_submodule(self.router_path) if self.router_path else self.model
            self.model._mmcompress_router = install_router(target, self.modality_token_ids)

    # -- norm scales (Gemma stores weight - 1) ---------------------------------------------------
    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """The effective multiplicative scale gamma of an RMSNorm."""
        return norm.weight.data.double() + self.norm_offset

    def set_norm_scale(self, norm: nn.Module, gamma: torch.Tensor) -> None:
        norm.weight.data.copy_((gamma - self.norm_offset).to(norm.weight.dtype))


# -- reader names ------------------------------------------------------------------------------------


def projection_name(path: str) -> str:
    """The projection a group's reader is, in the methods' and plans' vocabulary: ``self_attn.q_proj`` ->
    ``q``, ``mlp.experts.3.down_proj`` -> ``down`` (a name without ``_proj`` stays: ``in_proj_qkv``)."""
    return path.rsplit(".", 1)[-1].removesuffix("_proj")


def feeds_qk(path: str) -> bool:
    """Does the output of this reader enter the attention's q·k product (q, k, a fused qkv)?"""
    name = projection_name(path).lower()
    return name.startswith(("q", "k")) or any(t in name for t in ("qkv", "query", "key"))


# -- declarative pieces ------------------------------------------------------------------------------

def attention_groups(attn: str = "self_attn", norm: str = "input_layernorm", qkv=("q_proj", "k_proj", "v_proj"),
                     out: str = "o_proj", value: str | None = "v_proj") -> list[LinearGroup]:
    """``norm -> q, k, v`` and ``v -> o`` (the producer of o's input is v when nothing nonlinear
    per channel sits between them; ``value=None`` when something does)."""
    return [
        LinearGroup("attn_in", [f"{attn}.{p}" for p in qkv], norm, "norm"),
        LinearGroup("attn_out", [f"{attn}.{out}"], f"{attn}.{value}" if value else None,
                    "linear" if value else None),
    ]


def mlp_groups(norm: str = "post_attention_layernorm", mlp: str = "mlp") -> list[LinearGroup]:
    """``norm -> gate, up`` and ``up -> down`` (SwiGLU: down's input is act(gate) ⊙ up)."""
    return [
        LinearGroup("mlp_in", [f"{mlp}.gate_proj", f"{mlp}.up_proj"], norm, "norm"),
        LinearGroup("mlp_out", [f"{mlp}.down_proj"], f"{mlp}.up_proj", "linear"),
    ]


def layer_kind(*groups: list[LinearGroup], skipped: dict[str, str] | None = None) -> LayerKind:
    return LayerKind(tuple(g for gs in groups for g in gs), tuple((skipped or {}).items()))


# Llama-style pre-norm layer (Llama, Mistral, Qwen2/2.5/3, the Qwen-VL text decoders, Idefics3's Llama).
# Qwen3's per-head q_norm / k_norm act on the OUTPUTS of q_proj / k_proj, so smoothing (x/s into
# input_layernorm, s into the columns of q/k/v) leaves q_proj's output, hence q_norm's input, unchanged.
LLAMA_LAYER = layer_kind(attention_groups(), mlp_groups())
# Gemma3: sandwich norms; gate/up read pre_feedforward_layernorm (post_* norms sit on block outputs).
GEMMA3_LAYER = layer_kind(attention_groups(), mlp_groups("pre_feedforward_layernorm"))
# Qwen3.5 full attention: q_proj writes query and a per-channel output gate; o's input is
# attn(v) ⊙ sigmoid(gate), which is linear in v per channel, so v -> o still folds (under MHA).
QWEN3_5_FULL_LAYER = LLAMA_LAYER
# Qwen3.5 Gated-DeltaNet: the four input projections read input_layernorm's output; out_proj reads
# the gated RMSNorm w ⊙ RMS(core) ⊙ silu(z), whose w is one head_v_dim vector shared by all heads, so
# a per-channel s of out_proj's input cannot be folded into it (run-time smoothing only).
QWEN3_5_LINEAR_LAYER = layer_kind([
    LinearGroup("attn_in", [f"linear_attn.{p}" for p in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")],
                "input_layernorm", "norm"),
    LinearGroup("attn_out", ["linear_attn.out_proj"], None, None),
], mlp_groups())

ROUTER = "MoE router: top-k of its logits is discontinuous, so it stays in floating point"


def moe_layer(n_experts: int) -> LayerKind:
    """Qwen3-MoE-style sparse block after :func:`~.moe.unfuse_experts` (docs/moe.md):

    * ``mlp_in``: post_attention_layernorm -> every expert's gate_proj and up_proj; the router ``mlp.gate``
      reads the same normed input, so it follows a folded smoothing vector (its columns ⊙ s keep its logits,
      hence the routing, unchanged) and is where the statistics over all tokens are taken;
    * ``mlp_out.<e>``: expert e's up_proj -> its down_proj (down's input act(gate) ⊙ up is per expert and
      linear in up per channel), statistics over the tokens routed to expert e."""
    experts = [f"mlp.experts.{e}" for e in range(n_experts)]
    return layer_kind(attention_groups(), [
        LinearGroup("mlp_in", [f"{x}.{p}" for x in experts for p in ("gate_proj", "up_proj")],
                    "post_attention_layernorm", "norm", followers=("mlp.gate",), tap="mlp.gate"),
        *(LinearGroup(f"mlp_out.{e}", [f"{x}.down_proj"], f"{x}.up_proj", "linear") for e, x in enumerate(experts)),
    ], skipped={"mlp.gate": ROUTER})


def moe_layers(text_config, n_layers: int) -> list[LayerKind]:
    """Sparse MoE layers where transformers builds them (``mlp_only_layers``, ``decoder_sparse_step``), the
    Llama layer elsewhere."""
    n, step = int(getattr(text_config, "num_experts", 0) or 0), int(getattr(text_config, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(text_config, "mlp_only_layers", None) or [])
    sparse = moe_layer(n) if n else None
    return [sparse if n and i not in dense and (i + 1) % step == 0 else LLAMA_LAYER for i in range(n_layers)]


MOE_SPARSITY = ("its MoE experts: rotating the shared gate/up input would be exact (the router reads the same "
                "normed input and can be rotated with the experts), but each expert's down_proj input needs its "
                "own rotation, thresholds and Top-K level from the tokens routed to it, which the sparsity plans "
                "(one level per projection role) do not model yet")

GEMMA_SANDWICH = ("Gemma3's post-attention/post-feedforward norms apply γ⊙RMS to block outputs before the residual "
                  "add, so the rotation cannot be merged (it would need two extra d×d rotations per layer); use mode "
                  "'reference'")
DEEPSTACK = ("Qwen3-VL adds deepstack visual features into the residual stream after the first decoder layers, in "
             "the unrotated basis; merged mode would have to rotate each deepstack merger with the next layer's "
             "rotation; use mode 'reference'")


@dataclass(frozen=True)
class Family:
    """One architecture family (see module docstring)."""

    family: str
    lm_path: str | tuple  # candidates, first match wins (layouts differ across transformers versions)
    layers: LayerKind | dict | Callable  # one kind, config.layer_types value -> kind, or (text config, n) -> kinds
    token_attrs: dict = field(default_factory=dict)  # modality -> config attribute holding the placeholder id
    norm_offset: float = 0.0
    embedding_writers: tuple = ()
    embedding_matrices: tuple = ()  # parameters P of features x @ P written into the input embeddings
    merged_blocker: str | None = None
    sparsity_blocker: str | None = None
    head_path: str = "lm_head"
    image_spans: bool = False  # image positions from the inputs' image_bound spans
    router_path: str = ""
    call_convention: str | None = None  # how keyword inputs reach the model (:func:`install_call_convention`)
    moe: bool = False  # fused experts split into per-expert linears (:func:`~.moe.unfuse_experts`)
    container: ServingContainer | None = None  # the model vLLM serves the family inside (:class:`ServingContainer`)

    def kinds(self, config, n_layers: int) -> list[LayerKind]:
        if isinstance(self.layers, LayerKind):
            return [self.layers] * n_layers
        if callable(self.layers):
            return self.layers(config.get_text_config(), n_layers)
        types = getattr(config.get_text_config(), "layer_types", None) or []
        if len(types) != n_layers:
            raise UnsupportedModelError(f"{self.family}: config.layer_types has {len(types)} entries for "
                                        f"{n_layers} decoder layers")
        unknown = sorted(set(types) - set(self.layers))
        if unknown:
            raise UnsupportedModelError(f"{self.family}: decoder layer types {unknown} have no adapter "
                                        f"(known: {', '.join(sorted(self.layers))})")
        return [self.layers[t] for t in types]


_QWEN_VL_TOKENS = {"image": "image_token_id", "video": "video_token_id"}
_QWEN3_5_LAYERS = {"full_attention": QWEN3_5_FULL_LAYER, "linear_attention": QWEN3_5_LINEAR_LAYER}
_QWEN3_5 = dict(layers=_QWEN3_5_LAYERS, norm_offset=1.0)
# MiniCPM-V 4.6/4.7: the last of the merger's downsampling MLPs projects the image features into the LLM width
_MINICPMV4_WRITERS = tuple(f"merger.mlp.{i}.linear_2" for i in range(4))

# model_type -> family description.  Keys are transformers `config.model_type` values.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "model", LLAMA_LAYER),
    "mistral": Family("mistral", "model", LLAMA_LAYER),
    "qwen2": Family("qwen2", "model", LLAMA_LAYER),
    "qwen3": Family("qwen3", "model", LLAMA_LAYER),
    "gemma3_text": Family("gemma3", "model", GEMMA3_LAYER, norm_offset=1.0, merged_blocker=GEMMA_SANDWICH),
    "gemma3": Family("gemma3", "model.language_model", GEMMA3_LAYER, {"image": "image_token_id"}, norm_offset=1.0,
                     merged_blocker=GEMMA_SANDWICH),
    "idefics3": Family("idefics3", "model.text_model", LLAMA_LAYER, {"image": "image_token_id"},
                       embedding_writers=("connector.modality_projection.proj",)),
    "smolvlm": Family("smolvlm", "model.text_model", LLAMA_LAYER, {"image": "image_token_id"},
                      embedding_writers=("connector.modality_projection.proj",)),
    "qwen2_5_vl": Family("qwen2_5_vl", "model.language_model", LLAMA_LAYER, _QWEN_VL_TOKENS,
                         embedding_writers=("visual.merger.mlp.2",)),
    "qwen2_5_omni_thinker": Family(  # transformers >= 5.2x nests the text model; 5.17 puts it at `model`
        "qwen2_5_omni_thinker", ("model.language_model", "model"), LLAMA_LAYER,
        {"image": "image_token_index", "video": "video_token_index", "audio": "audio_token_index"},
        embedding_writers=("visual.merger.mlp.2", "audio_tower.proj"), container=QWEN2_5_OMNI_CONTAINER,
    ),
    "qwen3_vl": Family("qwen3_vl", "model.language_model", LLAMA_LAYER, _QWEN_VL_TOKENS,
                       embedding_writers=("visual.merger.linear_fc2",), merged_blocker=DEEPSTACK),
    "qwen3_5_text": Family("qwen3_5", "model", **_QWEN3_5),
    "qwen3_5": Family("qwen3_5", "model.language_model", token_attrs=_QWEN_VL_TOKENS,
                      embedding_writers=("visual.merger.linear_fc2",), **_QWEN3_5),
    "minicpmv4_6": Family("minicpmv4_6", "model.language_model", token_attrs=_QWEN_VL_TOKENS,
                          embedding_writers=_MINICPMV4_WRITERS, **_QWEN3_5),
    "minicpmv4_7": Family("minicpmv4_7", "model.language_model", token_attrs=_QWEN_VL_TOKENS,
                          embedding_writers=_MINICPMV4_WRITERS, **_QWEN3_5),
    # MiniCPM-Llama3-V-2.5 (Llama-3 LLM) and MiniCPM-V 2.6 (Qwen2 LLM): remote code only (--trust-remote-code);
    # the LLM is `llm`, images are written over the `image_bound` spans of the token sequence.
    "minicpmv": Family("minicpmv", "llm.model", LLAMA_LAYER, embedding_matrices=("resampler.proj",),
                       head_path="llm.lm_head", image_spans=True, router_path="llm", call_convention="minicpmv"),
    # Qwen3-Omni-MoE thinker: Qwen3 attention (q_norm/k_norm), sparse MoE blocks; experts split per expert
    "qwen3_omni_moe_thinker": Family(
        "qwen3_omni_moe_thinker", "model.language_model", moe_layers,
        {"image": "image_token_id", "video": "video_token_id", "audio": "audio_token_id"},
        embedding_writers=("visual.merger.mlp.2", "audio_tower.proj2"), sparsity_blocker=MOE_SPARSITY, moe=True),
}

UNSUPPORTED_NOTES = {
    "qwen2_5_omni": "use the thinker (Qwen2_5OmniThinkerForConditionalGeneration); the talker is not quantized",
    "qwen3_omni_moe": "use the thinker (Qwen3OmniMoeThinkerForConditionalGeneration); the talker and code2wav "
                      "are not quantized",
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def unsupported_message(model_type) -> str:
    note = UNSUPPORTED_NOTES.get(model_type)
    return (f"unsupported architecture {model_type!r}" + (f" ({note})" if note else "")
            + f"; supported model types: {', '.join(supported_model_types())}")


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the adapter for ``model`` or raise :class:`UnsupportedModelError`."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise UnsupportedModelError(unsupported_message(model_type))
    token_ids = {}
    for modality, attr in fam.token_attrs.items():
        value = getattr(config, attr, None)
        if value is not None:
            token_ids[modality] = int(value)
    candidates = (fam.lm_path,) if isinstance(fam.lm_path, str) else tuple(fam.lm_path)
    lm_path = next((c for c in candidates if _has_layers(model, c)), None)
    if lm_path is None:
        raise UnsupportedModelError(f"model of type {model_type!r} has no decoder layers at "
                                    f"{' or '.join(c + '.layers' for c in candidates)}")
    n_layers = len(model.get_submodule(lm_path).layers)
    install_call_convention(model)
    if fam.moe:
        from .moe import fused_experts, unfuse_experts

        layers = model.get_submodule(lm_path).layers
        if any(mlp.experts.gate_up_proj.is_meta for mlp in fused_experts(layers)):
            raise UnsupportedModelError(
                "MoE experts are fused 3-D tensors in the checkpoint and are split into per-expert linears in "
                "memory: load the model in memory (no --stream; data-free rtn: pass --calib)")
        unfuse_experts(layers, config.get_text_config().hidden_act)
    return ModelAdapter(
        model=model, family=fam.family, lm_path=lm_path, kinds=fam.kinds(config, n_layers),
        modality_token_ids=token_ids, norm_offset=fam.norm_offset,
        embedding_writers=fam.embedding_writers, embedding_matrices=fam.embedding_matrices,
        merged_blocker=fam.merged_blocker,
        sparsity_blocker=fam.sparsity_blocker, head_path=fam.head_path, image_spans=fam.image_spans,
        router_path=fam.router_path, moe=fam.moe, container=fam.container,
    )


def install_call_convention(model: nn.Module) -> None:
    """Let ``model(input_ids=..., pixel_values=..., ...)`` reach a model of a family that takes its inputs
    in another form (idempotent; the hook runs before any modality router, which is installed later)."""
    fam = FAMILIES.get(getattr(model.config, "model_type", None))
    if fam is None or fam.call_convention is None or getattr(model, "_mmcompress_call_convention", None) is not None:
        return
    from . import minicpmv

    {"minicpmv": minicpmv.install}[fam.call_convention](model)


def _has_layers(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(getattr(model.get_submodule(path), "layers", None), nn.ModuleList)
    except AttributeError:
        return False
