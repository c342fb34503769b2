"""A tiny stand-in for MiniCPM-Llama3-V-2.5's ``configuration_minicpm.py`` (remote code; tests only).

As there, the configuration of the whole model is the LLM's (a ``LlamaConfig``) plus the vision fields.
"""

from transformers import LlamaConfig


class MiniCPMVConfig(LlamaConfig):
    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, query_num=4, image_size=16, patch_size=8, vision_config=None, **kwargs):
        self.query_num = query_num
        self.image_size = image_size
        self.patch_size = patch_size
        self.vision_config = vision_config or {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64}
        super().__init__(**kwargs)
