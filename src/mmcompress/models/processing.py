"""Processors (tokenizer + image processor + audio feature extractor) from a local directory."""

from __future__ import annotations

from pathlib import Path


def load_processor(model_dir):
    """``AutoProcessor`` for multimodal directories (without torchvision), else the tokenizer."""
    from transformers import AutoProcessor, AutoTokenizer

    from .tiny import allow_missing_video_processor

    model_dir = Path(model_dir)
    if (model_dir / "preprocessor_config.json").is_file() or (model_dir / "processor_config.json").is_file():
        with allow_missing_video_processor():
            try:
                return AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
            except (AttributeError, ValueError, OSError, TypeError):
                pass
        return _manual_processor(model_dir)
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def _manual_processor(model_dir: Path):
    """Build the Qwen2.5-VL / Omni processor by hand when ``AutoProcessor`` needs a video processor."""
    import json

    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from .tiny import allow_missing_video_processor

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    image_processor = Qwen2VLImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    with allow_missing_video_processor():
        if cfg.get("model_type") == "qwen2_5_omni_thinker":
            from transformers import Qwen2_5OmniProcessor, WhisperFeatureExtractor

            fe = WhisperFeatureExtractor.from_pretrained(str(model_dir), local_files_only=True)
            return Qwen2_5OmniProcessor(image_processor=image_processor, video_processor=None, feature_extractor=fe,
                                        tokenizer=tok)
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None)
