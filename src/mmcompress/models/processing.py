"""Processors (tokenizer + image processor + audio feature extractor) from a local directory."""

from __future__ import annotations

from pathlib import Path


def load_processor(model_dir, *, trust_remote_code: bool = False):
    """``AutoProcessor`` for multimodal directories (without torchvision), else the tokenizer.

    Without ``trust_remote_code`` a processor that the directory's ``auto_map`` points to is not
    imported: the standard Qwen2.5-VL / Omni processor is built from the same files instead."""
    from transformers import AutoProcessor

    from .loading import auto_map_refs, load_tokenizer

    model_dir = Path(model_dir)
    if (model_dir / "preprocessor_config.json").is_file() or (model_dir / "processor_config.json").is_file():
        if trust_remote_code or not any(k.startswith(("AutoProcessor", "AutoImageProcessor", "AutoFeatureExtractor"))
                                        for k in auto_map_refs(model_dir)):
            with allow_missing_video_processor():
                try:
                    return without_video(AutoProcessor.from_pretrained(str(model_dir), local_files_only=True,
                                                                       trust_remote_code=trust_remote_code))
                except (AttributeError, ValueError, OSError, TypeError, ImportError):
                    pass
        return _manual_processor(model_dir, trust_remote_code=trust_remote_code)
    return load_tokenizer(model_dir, trust_remote_code=trust_remote_code)


def _manual_processor(model_dir: Path, *, trust_remote_code: bool = False):
    """Build the Qwen2.5-VL / Omni processor by hand when ``AutoProcessor`` needs a video processor."""
    import json

    from transformers import Qwen2VLImageProcessor

    from .loading import load_tokenizer

    cfg = json.loads((model_dir / "config.json").read_text())
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    image_keys = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
                  "image_std", "do_resize", "do_rescale", "do_normalize", "rescale_factor", "do_convert_rgb")
    image_processor = Qwen2VLImageProcessor(**{k: pre[k] for k in image_keys if k in pre})
    with allow_missing_video_processor():
        if cfg.get("model_type") == "qwen2_5_omni_thinker":
            from transformers import Qwen2_5OmniProcessor, WhisperFeatureExtractor

            fe_keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value",
                       "return_attention_mask")
            fe = WhisperFeatureExtractor(**{k: pre[k] for k in fe_keys if k in pre})
            return without_video(Qwen2_5OmniProcessor(image_processor=image_processor, video_processor=None,
                                                      feature_extractor=fe, tokenizer=tok))
        from transformers import Qwen2_5_VLProcessor

        return without_video(Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None))


def save_processor(processor, model_dir) -> None:
    """Save a Qwen2.5-VL/Omni processor that has no video processor (``save_pretrained`` refuses).

    Writes the tokenizer files and one ``preprocessor_config.json`` holding the image processor's
    settings and, for Omni, the audio feature extractor's, which :func:`load_processor` reads back.
    """
    import json

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(str(model_dir))
    config = {}
    fe = getattr(processor, "feature_extractor", None)
    if fe is not None:
        config.update(fe.to_dict())
    config.update(processor.image_processor.to_dict())
    config["processor_class"] = type(processor).__name__
    (model_dir / "preprocessor_config.json").write_text(json.dumps(config, indent=1, default=str))


class NoVideoProcessor:
    """Stands in for the torchvision-only video processor: carries the merge geometry that some
    transformers versions read even for image/audio-only inputs (5.17 reads ``merge_size``), and
    refuses video with a clear message."""

    def __init__(self, image_processor):
        self.merge_size = getattr(image_processor, "merge_size", 2)
        self.temporal_patch_size = getattr(image_processor, "temporal_patch_size", 2)
        self.patch_size = getattr(image_processor, "patch_size", 14)

    def __call__(self, *args, **kwargs):
        raise ValueError("video inputs need the Qwen video processor (torchvision); mmcompress builds these "
                         "processors for text, image and audio only")


def without_video(processor):
    """Give a processor built with ``video_processor=None`` the :class:`NoVideoProcessor` stand-in."""
    if getattr(processor, "video_processor", None) is None and hasattr(processor, "image_processor"):
        processor.video_processor = NoVideoProcessor(processor.image_processor)
    return processor


class allow_missing_video_processor:
    """The Qwen video processors need torchvision; let processors be built without one."""

    def __enter__(self):
        from transformers import ProcessorMixin

        self._orig = ProcessorMixin.check_argument_for_proper_class

        def check(inner_self, argument_name, argument):
            if argument is None:
                return None
            return self._orig(inner_self, argument_name, argument)

        ProcessorMixin.check_argument_for_proper_class = check
        return self

    def __exit__(self, *exc):
        from transformers import ProcessorMixin

        ProcessorMixin.check_argument_for_proper_class = self._orig
        return False
