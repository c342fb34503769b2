"""Inputs for the tiny models of every family (real pixel values through the model's own vision tower)."""

import torch

from mmcompress.models.modality import QWEN_MM_TOKENS

TEXT = " the quick brown fox jumps over the lazy dog"


def _ids(tok, name):
    return tok.convert_tokens_to_ids(QWEN_MM_TOKENS[name])


def family_inputs(kind: str, tok, seed: int = 0, text: str = TEXT) -> dict:
    """Model inputs for tiny ``kind``: text, with one image where the family takes images."""
    g = torch.Generator().manual_seed(seed)
    words = tok(text, return_tensors="pt")["input_ids"]
    img, bos, eos = _ids(tok, "image_token"), _ids(tok, "vision_bos_token"), _ids(tok, "vision_eos_token")

    def with_image(n_tokens):
        span = torch.tensor([[bos] + [img] * n_tokens + [eos]])
        return torch.cat([span, words], 1)

    if kind == "gemma3_vl":  # 28×28 image, 2×2 patches of 14 pooled to mm_tokens_per_image = 4
        ids = with_image(4)  # token_type_ids as the processor gives them: bidirectional attention in the image
        return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=g),
                "token_type_ids": (ids == img).long()}
    if kind in ("idefics3", "smolvlm"):  # 32×32 image, 4×4 patches of 8, pixel shuffle 2 -> 4 tokens
        return {"input_ids": with_image(4), "pixel_values": torch.randn(1, 1, 3, 32, 32, generator=g),
                "pixel_attention_mask": torch.ones(1, 1, 32, 32, dtype=torch.bool)}
    if kind in ("qwen3_vl", "qwen3_5_vl"):  # grid 1×4×4 patches of 8 (×2 frames), merge 2 -> 4 tokens
        ids = with_image(4)
        return {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 8 * 8, generator=g),
                "image_grid_thw": torch.tensor([[1, 4, 4]]), "mm_token_type_ids": (ids == img).long()}
    if kind in ("minicpmv4_6", "minicpmv4_7"):  # NaViT-packed 8×8 patches of 8, 16× merge -> 4 tokens
        ids = with_image(4)
        out = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 8, 64 * 8, generator=g),
               "target_sizes": torch.tensor([[8, 8]])}
        if kind == "minicpmv4_7":  # 4.7 computes 3-D (M-RoPE) positions from the token types
            out["mm_token_type_ids"] = (ids == img).long()
        return out
    if kind == "qwen3_omni_moe":  # one image (grid 1×4×4 patches of 8, merge 2 -> 4 tokens), 40 mel frames -> 5 tokens
        aud, abos, aeos = _ids(tok, "audio_token"), _ids(tok, "audio_bos_token"), _ids(tok, "audio_eos_token")
        ids = torch.cat([torch.tensor([[abos] + [aud] * 5 + [aeos]]), with_image(4)], 1)
        return {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 8 * 8, generator=g),
                "image_grid_thw": torch.tensor([[1, 4, 4]]), "input_features": torch.randn(1, 128, 40, generator=g),
                "feature_attention_mask": torch.ones(1, 40, dtype=torch.long)}
    return {"input_ids": words}


def calibration(kind: str, tok, n: int = 2) -> list[dict]:
    texts = [TEXT, " red green blue images audio and text", " a model compresses weights with care"]
    return [family_inputs(kind, tok, seed=j, text=texts[j % len(texts)]) for j in range(n)]
