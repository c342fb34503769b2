"""Small but genuine speech + vision LLMs assembled offline (issue 3, multimodal half).

* ``omni-mini``       ``Qwen2_5OmniThinkerForConditionalGeneration``: SmolLM2-135M decoder (Llama weights
  in the Qwen2 decoder with zero q/k/v biases, M-RoPE [8, 12, 12]), the real Whisper-base encoder as
  audio tower, a small trained vision tower, trained connectors.
* ``omni-mini-qwen``  the same around the Qwen2.5(-Coder)-0.5B decoder.
* ``vl-mini`` / ``vl-mini-qwen``  ``Qwen2_5_VLForConditionalGeneration`` with the same vision tower.

Only connector weights were trained (``benchmarks/train_connectors.py``); they ship in
``testbed/assets/*.safetensors`` so building a model needs no training.  The audio connector that
fits the stock Omni module structure is: the Whisper encoder's last layer (``audio_tower.layers.5``,
fine-tuned), ``ln_post`` (initialised from Whisper's final encoder norm, fine-tuned) and ``proj``.
The vision tower (``visual.*``) is a small Qwen2.5-VL ViT pre-trained on attribute classification,
its ``merger`` then trained through the frozen decoder.

On text-only input every model is exactly its source decoder (same logits).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ASSETS = Path(__file__).with_name("assets")

from mmcompress.models.modality import QWEN_MM_TOKENS as MM_TOKENS  # noqa: E402

# the small vision tower (1.4 M parameters with the merger into a 576-wide decoder)
VISION_CFG = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, in_channels=3, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1, 3],
                  hidden_act="silu")
# Whisper-base encoder as an Omni audio tower; n_window=1500 -> one attention chunk per clip (<= 30 s),
# as Whisper itself attends (the stock default of 100 would cut attention into 2 s blocks)
AUDIO_CFG = dict(num_mel_bins=80, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, d_model=512,
                 max_source_positions=1500, n_window=1500, activation_function="gelu", scale_embedding=False)
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 224 * 224

# the prompts the models are trained with: the evaluation's defaults (they start with a text token)
from mmcompress.eval.asr import AUDIO_PROMPT  # noqa: E402
from mmcompress.eval.vqa import IMAGE_PROMPT  # noqa: E402

DECODERS = {"smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
            "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, dequantized)"}
MODEL_SPECS = {
    "omni-mini": ("omni", "smollm2"),
    "omni-mini-qwen": ("omni", "qwen2.5-0.5b"),
    "vl-mini": ("vl", "smollm2"),
    "vl-mini-qwen": ("vl", "qwen2.5-0.5b"),
}


# -- tokenizer -------------------------------------------------------------------------------------


def add_mm_tokens(tok):
    """Add the Omni / VL special tokens that ``tok`` lacks (appended at the end of the vocabulary) and
    register them as named model-specific special tokens (``tok.image_token``, ``tok.audio_token_id``...),
    which the Qwen processors require and ``save_pretrained`` keeps.  Returns ``tok`` (modified)."""
    vocab = tok.get_vocab()
    missing = [t for t in MM_TOKENS.values() if t not in vocab]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    have = getattr(tok, "_special_tokens_map", {})
    todo = {k: v for k, v in MM_TOKENS.items() if have.get(k) != v}
    if todo:
        tok._set_model_specific_special_tokens(todo)
    return tok


def mm_token_ids(tok) -> dict[str, int]:
    return {k: tok.convert_tokens_to_ids(v) for k, v in MM_TOKENS.items()}


# -- configs ---------------------------------------------------------------------------------------


def _mrope_section(head_dim: int) -> list[int]:
    if head_dim == 64:
        return [8, 12, 12]
    half = head_dim // 2
    a = half // 4
    b = (half - a) // 2
    return [a, b, half - a - b]


def _text_config(src_cfg, vocab: int) -> dict:
    heads = src_cfg.num_attention_heads
    head_dim = getattr(src_cfg, "head_dim", None) or src_cfg.hidden_size // heads
    if head_dim != src_cfg.hidden_size // heads:
        raise ValueError("the Qwen2 decoder needs head_dim == hidden_size / num_heads")
    rp = getattr(src_cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(src_cfg, "rope_theta", 10000.0))
    if rp.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"unsupported source rope type {rp.get('rope_type')}")
    return dict(vocab_size=vocab, hidden_size=src_cfg.hidden_size, intermediate_size=src_cfg.intermediate_size,
                num_hidden_layers=src_cfg.num_hidden_layers, num_attention_heads=heads,
                num_key_value_heads=src_cfg.num_key_value_heads, rms_norm_eps=src_cfg.rms_norm_eps,
                max_position_embeddings=getattr(src_cfg, "max_position_embeddings", 32768),
                hidden_act=getattr(src_cfg, "hidden_act", "silu"), use_sliding_window=False,
                bos_token_id=getattr(src_cfg, "bos_token_id", None), eos_token_id=getattr(src_cfg, "eos_token_id", None),
                pad_token_id=getattr(src_cfg, "pad_token_id", None),
                tie_word_embeddings=bool(getattr(src_cfg, "tie_word_embeddings", False)),
                rope_parameters=dict(rope_type="default", rope_theta=float(theta),
                                     mrope_section=_mrope_section(head_dim)))


def _eos_ids(src_cfg, tok):
    eos = getattr(src_cfg, "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    return eos


def make_config(kind: str, src_cfg, tok, *, vision: dict | None = None, audio: dict | None = None):
    """The ``Qwen2_5OmniThinkerConfig`` (kind "omni") or ``Qwen2_5_VLConfig`` (kind "vl") around a
    source decoder config and a tokenizer that already carries the multimodal tokens."""
    import transformers as T

    ids = mm_token_ids(tok)
    vocab = max(src_cfg.vocab_size, len(tok))
    text = _text_config(src_cfg, vocab)
    tie = text["tie_word_embeddings"]
    vis = dict(VISION_CFG if vision is None else vision, out_hidden_size=src_cfg.hidden_size)
    common = dict(bos_token_id=getattr(src_cfg, "bos_token_id", None), eos_token_id=_eos_ids(src_cfg, tok),
                  pad_token_id=getattr(src_cfg, "pad_token_id", None), tie_word_embeddings=tie)
    if kind == "vl":
        cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vis, image_token_id=ids["image_token"],
                                 video_token_id=ids["video_token"], vision_start_token_id=ids["vision_bos_token"],
                                 vision_end_token_id=ids["vision_eos_token"], **common)
    elif kind == "omni":
        aud = dict(AUDIO_CFG if audio is None else audio, output_dim=src_cfg.hidden_size)
        cfg = T.Qwen2_5OmniThinkerConfig(
            text_config=text, vision_config=vis, audio_config=aud, audio_token_index=ids["audio_token"],
            image_token_index=ids["image_token"], video_token_index=ids["video_token"],
            audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
            vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"], **common)
        for k, v in dict(audio_token_id=ids["audio_token"], image_token_id=ids["image_token"],
                         video_token_id=ids["video_token"]).items():
            if not hasattr(cfg, k):
                setattr(cfg, k, v)
    else:
        raise ValueError(f"kind must be 'omni' or 'vl', not {kind!r}")
    for sub in ("text_config",):
        c = getattr(cfg, sub)
        c.tie_word_embeddings = tie
    return cfg


# -- weights ---------------------------------------------------------------------------------------


def decoder_state(src_model, vocab: int) -> dict[str, torch.Tensor]:
    """Source causal-LM weights renamed for the multimodal wrapper (``model.X`` ->
    ``model.language_model.X``), vocabulary padded with zero rows, zero q/k/v biases added for Llama."""
    sd = src_model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("model."):
            nk = "model.language_model." + k[len("model."):]
        elif k.startswith("lm_head."):
            nk = k
        else:
            continue
        if k in ("model.embed_tokens.weight", "lm_head.weight") and v.shape[0] < vocab:
            v = torch.cat([v, v.new_zeros(vocab - v.shape[0], v.shape[1])])
        out[nk] = v
    for k in list(out):
        if k.endswith("self_attn.q_proj.weight"):
            for p in ("q_proj", "k_proj", "v_proj"):
                bk = k.replace("q_proj.weight", f"{p}.bias")
                if bk not in out:
                    w = out[k.replace("q_proj", p)]
                    out[bk] = w.new_zeros(w.shape[0])
    return out


def vl_to_omni_vision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL vision-tower names (fused ``attn.qkv``) -> Omni vision-tower names (``attn.q/k/v``)."""
    out = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:
            q, kk, vv = v.chunk(3, dim=0)
            for name, t in (("q", q), ("k", kk), ("v", vv)):
                out[k.replace(".attn.qkv.", f".attn.{name}.")] = t.contiguous()
        else:
            out[k] = v
    return out


def assemble(kind: str, src_model, tok, *, vision: dict | None = None, audio: dict | None = None,
             audio_state: dict | None = None, vision_state: dict | None = None, audio_connector: dict | None = None):
    """Build the multimodal model in memory around ``src_model`` (a Llama / Qwen2 causal LM).

    ``tok`` gets the multimodal tokens.  ``audio_state``: Omni audio-tower weights (e.g. Whisper's);
    ``audio_connector``: trained audio-tower weights loaded on top; ``vision_state``: Qwen2.5-VL
    vision-tower weights (``patch_embed...``, ``blocks...``, ``merger...``).  Returns ``(model, tok)``."""
    import transformers as T

    add_mm_tokens(tok)
    cfg = make_config(kind, src_model.config, tok, vision=vision, audio=audio)
    cls = T.Qwen2_5OmniThinkerForConditionalGeneration if kind == "omni" else T.Qwen2_5_VLForConditionalGeneration
    # weights that no source provides (e.g. the audio tower's unused ``audio_bos_eos_token``) keep their
    # initialisation: seed it, so that every build writes the same bytes (the pinned hashes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(cfg)
    model = model.float()
    sd = decoder_state(src_model, cfg.text_config.vocab_size)
    if kind == "omni":
        for k, v in (audio_state or {}).items():
            sd["model.audio_tower." + k] = v
        for k, v in (audio_connector or {}).items():
            sd["model.audio_tower." + k] = v
    if vision_state:
        vs = vl_to_omni_vision(vision_state) if kind == "omni" else vision_state
        for k, v in vs.items():
            sd["model.visual." + k] = v
    own = model.state_dict()
    missing = [k for k in sd if k not in own]
    if missing:
        raise KeyError(f"unexpected weights for {type(model).__name__}: {missing[:5]}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} != {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)
    if cfg.text_config.tie_word_embeddings or getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), tok


def make_processor(kind: str, tok, *, num_mel_bins: int = 80):
    from transformers import Qwen2VLImageProcessor

    from mmcompress.models.processing import allow_missing_video_processor, without_video

    ip = Qwen2VLImageProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS)
    with allow_missing_video_processor():
        if kind == "omni":
            from transformers import Qwen2_5OmniProcessor, WhisperFeatureExtractor

            return without_video(Qwen2_5OmniProcessor(image_processor=ip, video_processor=None,
                                                      feature_extractor=WhisperFeatureExtractor(feature_size=num_mel_bins),
                                                      tokenizer=tok))
        from transformers import Qwen2_5_VLProcessor

        return without_video(Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=None))


def save_model_dir(model, tok, kind: str, out_dir, *, info: dict | None = None, num_mel_bins: int = 80) -> Path:
    """``save_pretrained`` the model, tokenizer and processor files so that
    ``mmcompress.models.processing.load_processor(out_dir)`` works."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    proc = make_processor(kind, tok, num_mel_bins=num_mel_bins)
    # ProcessorMixin.save_pretrained cannot save a processor without its video processor: write the
    # component files; the image processor and the feature extractor share preprocessor_config.json
    proc.image_processor.save_pretrained(out_dir)
    if kind == "omni":
        fe_cfg = proc.feature_extractor.to_dict()
        ip_cfg = json.loads((out_dir / "preprocessor_config.json").read_text())
        merged = {**fe_cfg, **ip_cfg, "processor_class": type(proc).__name__}
        (out_dir / "preprocessor_config.json").write_text(json.dumps(merged, indent=2))
    if info:
        (out_dir / "mm_testbed.json").write_text(json.dumps(info, indent=2))
    return out_dir


# -- assets ----------------------------------------------------------------------------------------


def load_asset(name: str) -> dict[str, torch.Tensor] | None:
    p = ASSETS / name
    if not p.is_file():
        return None
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(p)).items()}


def connector_assets(decoder: str) -> tuple[dict | None, dict | None]:
    """(audio connector, vision tower+merger) trained for ``decoder``; ``None`` where not trained."""
    return load_asset(f"audio_connector-{decoder}.safetensors"), load_asset(f"vision-{decoder}.safetensors")


REGISTRY_DECODER = {"smollm2": "smollm2-135m", "qwen2.5-0.5b": "qwen2.5-0.5b"}


def write_model(name: str, out_dir, *, decoder_dir=None, cache=None, progress: bool = False) -> dict:
    """Assemble the testbed model ``name`` (see ``MODEL_SPECS``) into the existing directory ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import mm_sources

    kind, decoder = MODEL_SPECS[name]
    whisper_dir = None
    if decoder_dir is None:
        from .registry import fetch

        # the sources are re-hashed in full (against their pins where they apply) before building from
        # them: a repair must not rebuild from a corrupted decoder or Whisper directory
        decoder_dir = fetch(REGISTRY_DECODER[decoder], cache=cache, progress=progress, verify=True)
        if kind == "omni":
            whisper_dir = fetch("whisper-base", cache=cache, progress=progress, verify=True)
    src = AutoModelForCausalLM.from_pretrained(str(decoder_dir), trust_remote_code=False, local_files_only=True,
                                               dtype=torch.float32)
    # local_files_only explicitly: transformers writes it into tokenizer_config.json, and a build must not
    # depend on whether HF_HUB_OFFLINE happens to be set (the hashes are pinned)
    tok = AutoTokenizer.from_pretrained(str(decoder_dir), trust_remote_code=False, local_files_only=True)
    audio_conn, vision_state = connector_assets(decoder)
    audio_state = None
    if kind == "omni":
        if whisper_dir is not None:
            from .whisper import omni_audio_tower_state_dict

            audio_state = {k: v.float() for k, v in omni_audio_tower_state_dict(model_dir=whisper_dir).items()}
        else:
            audio_state = mm_sources.whisper_encoder_state(cache=cache, progress=progress)
    model, tok = assemble(kind, src, tok, audio_state=audio_state, audio_connector=audio_conn,
                          vision_state=vision_state)
    info = dict(name=name, kind=kind, decoder=DECODERS[decoder], audio_connector_trained=audio_conn is not None,
                vision_trained=vision_state is not None, assets=assets_digest(decoder),
                prompts=dict(audio=AUDIO_PROMPT, image=IMAGE_PROMPT))
    save_model_dir(model, tok, kind, out_dir, info=info)
    return info


def build(name: str, out_dir, *, decoder_dir=None, cache=None) -> Path:
    """Build the testbed model ``name`` into ``out_dir`` (replaced atomically), without the registry cache."""
    tmp = Path(str(out_dir) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_model(name, tmp, decoder_dir=decoder_dir, cache=cache)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def assets_digest(decoder: str) -> str:
    """Short SHA-256 over the connector assets of ``decoder`` (part of the registry build id)."""
    import hashlib

    h = hashlib.sha256()
    for f in (f"audio_connector-{decoder}.safetensors", f"vision-{decoder}.safetensors"):
        p = ASSETS / f
        h.update(f.encode())
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()[:12]


# -- registry entries ------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "omni-mini": "Qwen2.5-Omni thinker: SmolLM2-135M decoder + real Whisper-base audio tower + small trained "
                 "vision tower; trained connectors (speech digits, attribute VQA)",
    "omni-mini-qwen": "Qwen2.5-Omni thinker: Qwen2.5-Coder-0.5B decoder + real Whisper-base audio tower + small "
                      "vision tower (connectors trained only if assets exist)",
    "vl-mini": "Qwen2.5-VL: SmolLM2-135M decoder + small trained vision tower (attribute VQA)",
    "vl-mini-qwen": "Qwen2.5-VL: Qwen2.5-Coder-0.5B decoder + small vision tower (trained only if assets exist)",
}


def _builder(name):
    def fn(ctx):
        write_model(name, ctx.out, cache=ctx.cache, progress=ctx.progress)

    return fn


def _register():
    try:
        from .registry import ModelEntry, register
    except Exception:  # pragma: no cover - registry missing
        return
    for name, (kind, decoder) in MODEL_SPECS.items():
        register(ModelEntry(
            name=name, description=_DESCRIPTIONS[name],
            licence="decoder: Apache-2.0; Whisper-base: MIT; connectors: this project",
            architecture="Qwen2_5OmniThinkerForConditionalGeneration" if kind == "omni" else
            "Qwen2_5_VLForConditionalGeneration",
            builder=_builder(name),
            how=f"{REGISTRY_DECODER[decoder]} decoder transplanted (exact on text)"
                + (" + whisper-base audio tower" if kind == "omni" else "")
                + " + connectors from testbed/assets",
            reference=_reference(name),
            recipe=f"1-{assets_digest(decoder)}",
        ))


def _reference(name):
    p = ASSETS / "results.json"
    if p.is_file():
        try:
            return json.loads(p.read_text()).get(name, {})
        except ValueError:  # pragma: no cover
            return {}
    return {}


_register()
try:
    from .mm_calib import register_calibration_hook as _hook

    _hook()
except ImportError:  # pragma: no cover
    pass
