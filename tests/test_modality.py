import pytest
import torch

from mmcompress.data import CalibrationSet
from mmcompress.engine import capture_inputs
from mmcompress.models import AUDIO, IMAGE, TEXT, get_adapter, modality_ids
from mmcompress.models.modality import current_modality_ids, install_router, masks

from .conftest import mm_inputs, tiny_model


def _expected_counts(kind, enc, model):
    n_img = int(enc["image_grid_thw"].prod(-1).sum()) // 4  # spatial merge 2x2
    n_aud = 0
    if kind == "qwen2_5_omni":
        frames = int(enc["feature_attention_mask"].sum())
        n_aud = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    return n_img, n_aud


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_5_omni"])
def test_mask_counts_match_processor_expansion(kind, tokenizer):
    model, tok = tiny_model(kind, tokenizer=tokenizer)
    enc, proc = mm_inputs(kind, tok)
    adapter = get_adapter(model)
    ids = modality_ids(enc["input_ids"], adapter.modality_token_ids)
    n_img, n_aud = _expected_counts(kind, enc, model)
    m = masks(ids)
    assert int(m["image"].sum()) == n_img > 0
    assert int(m["audio"].sum()) == n_aud
    if kind == "qwen2_5_omni":
        assert n_aud > 0
    # markers (vision start/end, audio bos/eos) are text
    vs = tok.convert_tokens_to_ids("<|vision_start|>")
    assert (ids[enc["input_ids"] == vs] == TEXT).all()
    assert int(m["text"].sum()) == enc["input_ids"].numel() - n_img - n_aud
    # the decoder sees exactly those positions: the captured layer-0 input has the same length
    cap = capture_inputs(model, adapter, [enc], progress=False)
    assert cap.hidden[0].shape[1] == enc["input_ids"].shape[1]
    assert torch.equal(cap.modality[0], ids)
    counts = CalibrationSet([enc]).token_counts(adapter.modality_token_ids)
    assert counts["image"] == n_img and counts["audio"] == n_aud


def test_decode_and_text_only_are_all_text():
    tok_ids = {"image": 5, "audio": 6}
    assert (modality_ids(torch.tensor([[5]]), tok_ids) == TEXT).all()  # decode step
    ids = modality_ids(torch.tensor([[1, 5, 5, 6, 2]]), tok_ids)
    assert ids.tolist() == [[TEXT, IMAGE, IMAGE, AUDIO, TEXT]]
    assert (modality_ids(torch.tensor([[1, 2, 3]]), tok_ids) == TEXT).all()


def test_router_publishes_ids_during_forward(tokenizer):
    model, tok = tiny_model("qwen2_5_vl", tokenizer=tokenizer)
    enc, _ = mm_inputs("qwen2_5_vl", tok)
    seen = []
    layer = get_adapter(model).layers[0]
    layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(current_modality_ids()))
    install_router(model, get_adapter(model).modality_token_ids)
    model(**enc)
    assert seen[-1] is not None and int((seen[-1] == IMAGE).sum()) > 0
    assert current_modality_ids() is None  # cleared after the forward


def test_processors_without_video_refuse_video_clearly(tokenizer):
    """Our Qwen processors carry a stand-in video processor (transformers 5.17 reads its merge_size even
    for image/audio-only inputs); asking it for video gives a clear error."""
    from mmcompress.models.processing import NoVideoProcessor
    from .tiny_models import tiny_processor

    for kind in ("qwen2_5_vl", "qwen2_5_omni"):
        proc = tiny_processor(kind, tokenizer)
        assert isinstance(proc.video_processor, NoVideoProcessor)
        assert proc.video_processor.merge_size == proc.image_processor.merge_size
        with pytest.raises(ValueError, match="video inputs"):
            proc.video_processor(videos=[None])


def test_adapter_finds_the_text_model_in_either_omni_layout(tokenizer):
    """transformers 5.2x nests the Omni thinker's text model at ``model.language_model``; 5.17 has it at
    ``model``: the adapter takes whichever holds the decoder layers."""
    from mmcompress.models.adapters import get_adapter
    from .tiny_models import tiny_model

    model, _ = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    assert get_adapter(model).lm_path == "model.language_model"
    n = len(model.model.language_model.layers)
    model.model = model.model.language_model  # the 5.17 layout
    ad = get_adapter(model)
    assert ad.lm_path == "model" and len(ad.layers) == n
