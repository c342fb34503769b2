"""GGUF -> ordinary Hugging Face directory (docs/testbed.md §3).

transformers reads the GGUF file (needs the ``gguf`` package) and dequantizes every tensor to fp32.
The loaded model is still flagged as GGUF-quantized, so ``hf_quantizer`` and
``config.quantization_config`` are cleared before ``save_pretrained`` writes plain safetensors.

Caveat (§4): the result holds *dequantized low-bit* weights.  SmolLM2's linear weights lie exactly on
an asymmetric 4-bit grid with groups of 32, so W4 g32 asymmetric RTN is lossless on it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .fetch import TestbedError


def convert_gguf(gguf_path, out_dir, dtype="float32", progress: bool = True) -> Path:
    """Write the model and tokenizer of ``gguf_path`` as a Hugging Face directory ``out_dir``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise TestbedError("converting GGUF weights needs the `gguf` package: pip install 'mmcompress[testbed]'") from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    verbosity = transformers.logging.get_verbosity()
    if not progress:
        transformers.logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, gguf_file=name, dtype=getattr(torch, dtype),
                                                     local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    # the tensors are plain fp32 now; drop the GGUF "quantized" flag so save_pretrained accepts the model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            model.__dict__.pop(attr)
    model.config.dtype = dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), max_shard_size="64GB")
    tok.save_pretrained(str(out_dir))
    if not (out_dir / "model.safetensors").is_file():
        raise TestbedError(f"conversion of {gguf_path.name} did not produce model.safetensors")
    return out_dir


def build_causal_lm(ctx) -> None:
    """Registry builder: the verified assembled GGUF -> ``ctx.out``; licence/notice files copied along."""
    convert_gguf(ctx.assembled, ctx.out, progress=ctx.progress)
    for key, path in ctx.files.items():
        shutil.copyfile(path, ctx.out / key)
