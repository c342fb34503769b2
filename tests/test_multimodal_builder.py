"""Builder logic of the multimodal testbed models (omni-mini & co.) on tiny random source decoders."""

import numpy as np
import pytest
import torch

from mmcompress_testbed import multimodal as M

TINY_AUDIO = dict(num_mel_bins=80, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                  max_source_positions=1500, n_window=1500)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1])


def _plain_tokenizer():
    """A byte-level BPE tokenizer WITHOUT the multimodal tokens (so the builder must add them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 " * 30], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _source(kind, tie, seed=0):
    import transformers as T

    tok = _plain_tokenizer()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=tie, rope_theta=100000.0, eos_token_id=0, bos_token_id=0)
    cls, ccls = (T.LlamaForCausalLM, T.LlamaConfig) if kind == "llama" else (T.Qwen2ForCausalLM, T.Qwen2Config)
    model = cls(ccls(**cfg)).eval()
    with torch.no_grad():  # non-trivial norms and (for Qwen2) biases
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.rand_like(p) * 0.5)
    return model, tok


@pytest.mark.parametrize("arch,src_kind,tie", [("omni", "llama", True), ("vl", "qwen2", False),
                                               ("omni", "qwen2", False), ("vl", "llama", True)])
def test_text_logits_identical_to_source(arch, src_kind, tie):
    src, tok = _source(src_kind, tie)
    n0 = len(tok)
    ids = tok("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = src(ids).logits
    model, tok = M.assemble(arch, src, tok, vision=TINY_VISION, audio=TINY_AUDIO)
    # the 7 multimodal tokens were added and the vocabulary grew with zero rows
    assert len(tok) == n0 + 7
    cfg = model.config
    assert cfg.text_config.vocab_size == n0 + 7
    emb = model.get_input_embeddings().weight
    assert torch.count_nonzero(emb[n0:]) == 0
    assert cfg.text_config.tie_word_embeddings == tie
    assert cfg.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.shape[-1] == n0 + 7
    assert torch.allclose(out[..., :n0], ref, atol=1e-5, rtol=0), (out[..., :n0] - ref).abs().max()
    # token-id config attributes match the tokenizer
    ids_map = M.mm_token_ids(tok)
    if arch == "omni":
        assert cfg.audio_token_index == ids_map["audio_token"] == tok.audio_token_id
        assert cfg.audio_start_token_id == ids_map["audio_bos_token"]
        assert cfg.audio_end_token_id == ids_map["audio_eos_token"]
        assert cfg.image_token_index == ids_map["image_token"]
    else:
        assert cfg.image_token_id == ids_map["image_token"] == tok.image_token_id
    assert cfg.vision_start_token_id == ids_map["vision_bos_token"]
    assert cfg.vision_end_token_id == ids_map["vision_eos_token"]


def test_llama_gets_zero_qkv_biases_and_qwen_keeps_its_own():
    src, _ = _source("llama", True)
    sd = M.decoder_state(src, src.config.vocab_size + 3)
    assert torch.count_nonzero(sd["model.language_model.layers.0.self_attn.k_proj.bias"]) == 0
    assert sd["model.language_model.embed_tokens.weight"].shape[0] == src.config.vocab_size + 3
    qsrc, _ = _source("qwen2", False)
    qsd = M.decoder_state(qsrc, qsrc.config.vocab_size)
    assert torch.equal(qsd["model.language_model.layers.1.self_attn.q_proj.bias"],
                       qsrc.model.layers[1].self_attn.q_proj.bias)


def test_modality_token_counts_and_forward(tmp_path):
    from mmcompress.models.processing import load_processor

    src, tok = _source("llama", True)
    model, tok = M.assemble("omni", src, tok, vision=TINY_VISION, audio=TINY_AUDIO)
    out = M.save_model_dir(model, tok, "omni", tmp_path / "omni", info={"name": "tiny"})
    proc = load_processor(out)
    assert type(proc).__name__ == "Qwen2_5OmniProcessor"
    assert proc.feature_extractor.feature_size == 80
    from PIL import Image

    img = Image.new("RGB", (112, 112), (200, 10, 10))
    wav = (0.3 * np.sin(np.arange(32000) / 16000 * 2 * np.pi * 300)).astype(np.float32)  # 2 s
    text = "<|vision_start|><|image_pad|><|vision_end|><|audio_bos|><|AUDIO|><|audio_eos|> hi"
    inp = proc(text=[text], images=[img], audio=[wav], return_tensors="pt")
    ids = inp["input_ids"][0]
    n_img = int((ids == tok.image_token_id).sum())
    n_aud = int((ids == tok.audio_token_id).sum())
    assert n_img == 16  # 112x112 -> 8x8 patches -> 4x4 merged
    frames = int(inp["feature_attention_mask"].sum())
    assert frames == 200
    assert n_aud == ((frames - 1) // 2 + 1 - 2) // 2 + 1 == 50
    with torch.no_grad():
        logits = model(**inp).logits
    assert logits.shape[:2] == (1, ids.numel())
    assert torch.isfinite(logits).all()


def test_vision_weights_convert_vl_to_omni():
    src, tok = _source("qwen2", False)
    vl, tok = M.assemble("vl", src, tok, vision=TINY_VISION)
    vis = {k[len("model.visual."):]: v for k, v in vl.state_dict().items() if k.startswith("model.visual.")}
    src2, tok2 = _source("qwen2", False)
    omni, _ = M.assemble("omni", src2, tok2, vision=TINY_VISION, audio=TINY_AUDIO, vision_state=vis)
    px = torch.randn(64, 3 * 2 * 14 * 14)
    grid = torch.tensor([[1, 8, 8]])
    with torch.no_grad():
        a = vl.model.visual(px, grid_thw=grid).pooler_output
        b = omni.model.visual(px, grid_thw=grid)
        b = b.pooler_output if hasattr(b, "pooler_output") else b
    assert torch.allclose(a, b, atol=1e-5)
