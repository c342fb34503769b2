"""Tiny random models (and a matching tokenizer/processor) built from configs, for the tests.

No download: a byte-level BPE tokenizer is trained in well under a second on a fixed text, the
special tokens of Qwen2.5-VL / Qwen2.5-Omni are added, and the model configs use their ids.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmcompress.models.modality import QWEN_MM_TOKENS as SPECIAL
from mmcompress.models.processing import allow_missing_video_processor, without_video

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model compresses weights and activations. "
    "Quantization maps real numbers to a small grid; sparsity keeps the largest channels. "
    "Images, audio and text tokens flow through one decoder. 0 1 2 3 4 5 6 7 8 9 red green blue "
)


def tiny_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", *SPECIAL.values()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS * 20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=dict(SPECIAL))
    return fast


def _text_cfg(vocab, hidden=64, inter=128, layers=2, heads=4, kv=2, **kw):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, **kw)


_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1], patch_size=14,
               temporal_patch_size=2, spatial_merge_size=2, window_size=112)


def tiny_model(kind: str = "llama", *, layers: int = 2, hidden: int = 64, intermediate: int = 128, heads: int = 4,
               kv_heads: int = 2, tie: bool = False, seed: int = 0, tokenizer=None, dtype=torch.float32):
    """A random model of ``kind`` (one of :data:`TINY_KINDS`) with the ids of :func:`tiny_tokenizer`;
    returns ``(model, tokenizer)``.  Multimodal kinds use ``<|image_pad|>`` / ``<|video_pad|>`` as
    their placeholders whatever the family calls them."""
    import transformers as T

    tok = tokenizer or tiny_tokenizer()
    vocab = len(tok)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL.items()}
    torch.manual_seed(seed)
    text = _text_cfg(vocab, hidden, intermediate, layers, heads, kv_heads, tie_word_embeddings=tie)
    eos = tok.eos_token_id
    if kind == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**text, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    elif kind == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**text, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    elif kind == "mistral":
        model = T.MistralForCausalLM(T.MistralConfig(**text, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    elif kind == "gemma3":
        cfg = T.Gemma3TextConfig(**text, head_dim=hidden // heads, sliding_window=16, bos_token_id=eos, eos_token_id=eos,
                                 pad_token_id=eos)
        model = T.Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # Gemma norms start at 0 (= scale 1); make them non-trivial
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(-0.5, 1.0)
    elif kind in ("qwen2_5_vl", "qwen2_5_omni"):
        rope = dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=1e6)
        text_mm = dict(text, rope_parameters=rope)
        head_dim = hidden // heads
        if head_dim != 16:
            text_mm["rope_parameters"] = dict(rope, mrope_section=_mrope_section(head_dim))
        vision = dict(_VISION, out_hidden_size=hidden)
        if kind == "qwen2_5_vl":
            cfg = T.Qwen2_5_VLConfig(text_config=text_mm, vision_config=vision, image_token_id=ids["image_token"],
                                     video_token_id=ids["video_token"], vision_start_token_id=ids["vision_bos_token"],
                                     vision_end_token_id=ids["vision_eos_token"], bos_token_id=eos, eos_token_id=eos,
                                     tie_word_embeddings=tie)
            model = T.Qwen2_5_VLForConditionalGeneration(cfg)
        else:
            audio = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                         output_dim=hidden)
            cfg = T.Qwen2_5OmniThinkerConfig(
                text_config=text_mm, vision_config=vision, audio_config=audio, audio_token_index=ids["audio_token"],
                image_token_index=ids["image_token"], video_token_index=ids["video_token"],
                audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
                vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
                bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=tie)
            model = T.Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    elif kind in _MORE_KINDS:
        model = _MORE_KINDS[kind](T, text, ids, eos, tie)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; known: {', '.join(TINY_KINDS)}")
    _randomize_norms(model)
    return model.to(dtype).eval(), tok


def _tokens(ids, eos):
    return dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def _qwen3(T, text, ids, eos, tie):
    return T.Qwen3ForCausalLM(T.Qwen3Config(**text, head_dim=text["hidden_size"] // text["num_attention_heads"],
                                            **_tokens(ids, eos)))


def _gemma3_vl(T, text, ids, eos, tie):
    """Gemma3ForConditionalGeneration: SigLIP on 28×28 images (2×2 patches of 14) pooled to 4 tokens."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text_cfg = dict(text, head_dim=head_dim, sliding_window=16, **_tokens(ids, eos))
    text_cfg.pop("tie_word_embeddings")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = T.Gemma3Config(text_config=text_cfg, vision_config=vision, mm_tokens_per_image=4,
                         image_token_index=ids["image_token"], boi_token_index=ids["vision_bos_token"],
                         eoi_token_index=ids["vision_eos_token"], tie_word_embeddings=tie)
    model = T.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # Gemma norms start at 0 (= scale 1); make them non-trivial
        for n, p in model.named_parameters():
            if "language_model" in n and n.endswith("norm.weight"):
                p.uniform_(-0.5, 1.0)
    return model


def _idefics3(T, text, ids, eos, tie, smolvlm=False):
    """Idefics3 / SmolVLM: SigLIP on 32×32 images (4×4 patches of 8), pixel shuffle by 2 -> 4 tokens."""
    text_cfg = dict(text, **_tokens(ids, eos))
    text_cfg.pop("tie_word_embeddings")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cls, cfg_cls = ((T.SmolVLMForConditionalGeneration, T.SmolVLMConfig) if smolvlm
                    else (T.Idefics3ForConditionalGeneration, T.Idefics3Config))
    cfg = cfg_cls(text_config=text_cfg, vision_config=vision, image_token_id=ids["image_token"], scale_factor=2,
                  tie_word_embeddings=tie, pad_token_id=eos)
    return cls(cfg)


def _qwen3_vl(T, text, ids, eos, tie):
    """Qwen3-VL: patch 8, merge 2, deepstack features from vision layers 0 and 1 into decoder layers 0, 1."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rope = dict(rope_type="default", mrope_section=_mrope_section(head_dim), mrope_interleaved=True, rope_theta=1e6)
    text_cfg = dict(text, head_dim=head_dim, rope_parameters=rope, **_tokens(ids, eos))
    text_cfg.pop("tie_word_embeddings")
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    cfg = T.Qwen3VLConfig(text_config=text_cfg, vision_config=vision, image_token_id=ids["image_token"],
                          video_token_id=ids["video_token"], vision_start_token_id=ids["vision_bos_token"],
                          vision_end_token_id=ids["vision_eos_token"], tie_word_embeddings=tie)
    return T.Qwen3VLForConditionalGeneration(cfg)


def _qwen3_5_text_cfg(text, ids, eos):
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    n = text["num_hidden_layers"]
    cfg = dict(text, head_dim=head_dim, linear_num_value_heads=4, linear_num_key_heads=2,
               linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
               layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
               **_tokens(ids, eos))
    return cfg


def _qwen3_5(T, text, ids, eos, tie):
    """Qwen3.5 text: layers alternate Gated-DeltaNet (linear attention) and gated full attention."""
    return T.Qwen3_5ForCausalLM(T.Qwen3_5TextConfig(**_qwen3_5_text_cfg(text, ids, eos)))


def _qwen3_5_vl(T, text, ids, eos, tie):
    """Qwen3.5 with its vision tower (Qwen3_5ForConditionalGeneration): the Qwen3-VL geometry, no deepstack."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text_cfg = _qwen3_5_text_cfg(text, ids, eos)
    text_cfg.pop("tie_word_embeddings")
    text_cfg["rope_parameters"] = dict(rope_type="default", mrope_section=_mrope_section(head_dim // 4),
                                       mrope_interleaved=True, rope_theta=1e6, partial_rotary_factor=0.25)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=64)
    cfg = T.Qwen3_5Config(text_config=text_cfg, vision_config=vision, image_token_id=ids["image_token"],
                          video_token_id=ids["video_token"], vision_start_token_id=ids["vision_bos_token"],
                          vision_end_token_id=ids["vision_eos_token"], tie_word_embeddings=tie)
    return T.Qwen3_5ForConditionalGeneration(cfg)


def _minicpmv(T, text, ids, eos, tie, version="4_6"):
    """MiniCPM-V 4.6 / 4.7: a SigLIP-style NaViT tower with window merger on a Qwen3.5 text backbone."""
    text_cfg = _qwen3_5_text_cfg(text, ids, eos)
    text_cfg.pop("tie_word_embeddings")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=8, insert_layer_id=0)
    cfg_cls = getattr(T, f"MiniCPMV{version}Config")
    cfg = cfg_cls(text_config=dict(text_cfg, model_type="qwen3_5_text"), vision_config=vision, image_size=64,
                  image_token_id=ids["image_token"], video_token_id=ids["video_token"], insert_layer_id=0,
                  tie_word_embeddings=tie)
    return getattr(T, f"MiniCPMV{version}ForConditionalGeneration")(cfg)


def _qwen3_omni_moe(T, text, ids, eos, tie):
    """Qwen3-Omni-MoE thinker: 4 experts (top-2) per decoder layer, a 2-layer vision tower (patch 8,
    merge 2, deepstack from vision layer 0) and a 2-layer audio encoder."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rope = dict(rope_type="default", mrope_section=_mrope_section(head_dim), mrope_interleaved=True, rope_theta=1e6)
    text_cfg = dict(text, head_dim=head_dim, rope_parameters=rope, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=text["intermediate_size"] // 2, **_tokens(ids, eos))
    text_cfg.pop("tie_word_embeddings")
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    audio = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                 output_dim=text["hidden_size"], downsample_hidden_size=16)
    cfg = T.Qwen3OmniMoeThinkerConfig(
        text_config=text_cfg, vision_config=vision, audio_config=audio, image_token_id=ids["image_token"],
        video_token_id=ids["video_token"], audio_token_id=ids["audio_token"],
        audio_start_token_id=ids["audio_bos_token"], vision_start_token_id=ids["vision_bos_token"],
        tie_word_embeddings=tie)
    model = T.Qwen3OmniMoeThinkerForConditionalGeneration(cfg)
    with torch.no_grad():  # the router starts at zero (every expert tied): give it a real routing
        g = torch.Generator().manual_seed(4321)
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


_MORE_KINDS = {
    "qwen3": _qwen3,
    "gemma3_vl": _gemma3_vl,
    "idefics3": _idefics3,
    "smolvlm": lambda *a: _idefics3(*a, smolvlm=True),
    "qwen3_vl": _qwen3_vl,
    "qwen3_5": _qwen3_5,
    "qwen3_5_vl": _qwen3_5_vl,
    "minicpmv4_6": lambda *a: _minicpmv(*a, version="4_6"),
    "minicpmv4_7": lambda *a: _minicpmv(*a, version="4_7"),
    "qwen3_omni_moe": _qwen3_omni_moe,
}
TINY_KINDS = ("llama", "qwen2", "mistral", "gemma3", "qwen2_5_vl", "qwen2_5_omni", *_MORE_KINDS)


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    a = half // 4
    b = (half - a) // 2
    return [a, b, half - a - b]


@torch.no_grad()
def _randomize_norms(model):
    """Random RMSNorm scales so that folding tests are not vacuous (transformers inits them to 1)."""
    g = torch.Generator().manual_seed(1234)
    for n, p in model.named_parameters():
        if n.endswith("layernorm.weight") or n.endswith(".norm.weight"):
            if "language_model" in n or n.startswith("model.layers") or n.startswith("model.norm"):
                p.copy_(p + torch.rand(p.shape, generator=g) * 0.8 - 0.2)


def tiny_processor(kind: str, tokenizer):
    """A Qwen2.5-VL or Qwen2.5-Omni processor around ``tokenizer`` (no torchvision, no video)."""
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor

        with allow_missing_video_processor():
            return without_video(Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                     video_processor=None))
    if kind == "qwen2_5_omni":
        from transformers import Qwen2_5OmniProcessor, WhisperFeatureExtractor

        with allow_missing_video_processor():
            return without_video(Qwen2_5OmniProcessor(image_processor=image_processor, video_processor=None,
                                                      feature_extractor=WhisperFeatureExtractor(feature_size=128),
                                                      tokenizer=tokenizer))
    raise ValueError(f"no processor for {kind!r}")


def save_tiny(path, kind="llama", **kw) -> Path:
    """Write a tiny random model and its tokenizer to ``path`` with ``save_pretrained``."""
    model, tok = tiny_model(kind, **kw)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
