"""vLLM plugin that serves MASQuant's per-modality path (entry point ``vllm.general_plugins``).

A compressed-tensors export of a MASQuant artifact (``mmcompress export --format compressed-tensors``)
is a stock checkpoint of the text path plus ``mmcompress_masquant.safetensors`` and a
``quantization_config["mmcompress_masquant"]`` block (:mod:`mmcompress.export.masquant_vllm`).  When
vLLM starts it calls :func:`register` in every process; that registers

* the quantization config ``mmcompress-masquant`` (:class:`._impl.MASQuantConfig`), which claims
  compressed-tensors checkpoints carrying the block: each quantized linear runs vLLM's own
  compressed-tensors kernel; image / audio tokens first get their input multiplied by ``s_T / s_m``
  and add the low-rank correction ``(x / s_m) L_m R_m``; text and decode tokens take the plain path;
* subclasses of the multimodal models it supports (Qwen2.5-VL, the Qwen2.5-Omni thinker) that publish, per scheduled token, its
  modality (placeholder token id of a position that vLLM fills with encoder embeddings).

Serve without the plugin's modality path: ``LLM(..., quantization="compressed-tensors")`` (or
``VLLM_PLUGINS=`` with the plugin's name left out).  Nothing here is imported by mmcompress itself; the
module imports vLLM only inside :func:`register`.  See ``docs/vllm_plugin.md``.
"""

from __future__ import annotations

from .constants import NAME  # noqa: F401  (re-exported)


def register() -> None:
    """Entry point: register the quantization config and the model subclasses (idempotent)."""
    import torch

    # vLLM (0.32) runs its AMX attention kernel for bfloat16 on AMX CPUs without asking Linux for the AMX
    # tiles (arch_prctl ARCH_REQ_XCOMP_PERM); unless a oneDNN call asked first, the process dies with SIGILL
    # (measured: a W4A8 export, whose GEMMs never touch oneDNN).  Ask in every process the plugin loads in;
    # False and nothing else on CPUs without AMX.
    if hasattr(torch.cpu, "_init_amx"):
        torch.cpu._init_amx()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    if NAME not in QUANTIZATION_METHODS:
        from ._impl import MASQuantConfig

        register_quantization_config(NAME)(MASQuantConfig)
    from vllm import ModelRegistry

    from ._impl import MODEL_SUBCLASSES

    for arch in MODEL_SUBCLASSES:
        ModelRegistry.register_model(arch, f"mmcompress.vllm_plugin._models:{arch}")
