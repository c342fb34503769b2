"""Loading Hugging Face model directories (local only; nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from .adapters import FAMILIES, UnsupportedModelError, unsupported_message


def _check_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def read_config(path):
    path = _check_dir(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(unsupported_message(model_type))
    return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)


def model_class_for(config):
    archs = getattr(config, "architectures", None) or []
    for name in archs:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise UnsupportedModelError(f"no transformers model class for {config.model_type!r}")


def load_hf_model(path, dtype: torch.dtype | str = torch.float32, device="cpu"):
    """Load a local model directory (plain Hugging Face or an mmcompress artifact)."""
    from ..export.serialization import is_artifact, load

    if is_artifact(path):
        return load(path, device=device)
    config = read_config(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cls = model_class_for(config)
    model = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.eval().to(device)
    model._mmcompress_source = str(path)
    return model


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
