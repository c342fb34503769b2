"""Names shared by the plugin entry point and its implementation (no vLLM import)."""

NAME = "mmcompress-masquant"  # the quantization method vLLM knows the plugin by
