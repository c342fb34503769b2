"""Model subclasses that publish each scheduled token's modality for :class:`._impl.MASLinearMethod`.

They differ from vLLM's classes only in :meth:`embed_input_ids` (publish, then the stock
embedding) and :meth:`forward` (clear the published rows afterwards, so that a later forward without an
embedding step, e.g. vLLM's dummy runs, sees all text).  Registered under the stock architecture names
by :func:`mmcompress.vllm_plugin.register`; without an mmcompress-masquant checkpoint nothing is published.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerForConditionalGeneration as _Qwen2_5OmniThinker,
)
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as _Qwen2_5_VL

from ._impl import clear, publish


class _PublishesModality:
    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        publish(input_ids, is_multimodal if multimodal_embeddings is not None else None)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, *args, **kwargs):
        try:
            return super().forward(*args, **kwargs)
        finally:
            clear()


class Qwen2_5_VLForConditionalGeneration(_PublishesModality, _Qwen2_5_VL):
    pass


# vLLM registers the Qwen2.5-Omni thinker under both names of the full Omni model (it builds only the thinker);
# mmcompress exports a thinker-only artifact in that layout (``ModelAdapter.container``)
class Qwen2_5OmniModel(_PublishesModality, _Qwen2_5OmniThinker):
    pass


class Qwen2_5OmniForConditionalGeneration(_PublishesModality, _Qwen2_5OmniThinker):
    pass
