from .adapters import ModelAdapter, UnsupportedModelError, get_adapter, supported_model_types
from .modality import AUDIO, IMAGE, TEXT, VIDEO, modality_ids

__all__ = ["ModelAdapter", "UnsupportedModelError", "get_adapter", "supported_model_types",
           "TEXT", "IMAGE", "AUDIO", "VIDEO", "modality_ids"]
