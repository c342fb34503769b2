"""mmcompress: post-training compression for LLMs and multimodal LLMs.

Public API (imported lazily, so ``mmcompress --version`` and cached testbed fetches start fast)::

    model = mmcompress.load_model("path/to/hf-dir")
    calib = mmcompress.CalibrationSet.from_text_file("wiki.txt", tokenizer, nsamples=128, seqlen=512)
    mmcompress.quantize(model, calib, method="smoothquant", scheme="w8a8")
    mmcompress.sparsify(model, calib, method="larosa", sparsity=0.4)
    mmcompress.save(model, "out/")
    model = mmcompress.load("out/")
"""

__version__ = "0.1.0"

_LAZY = {
    "CalibrationSet": ("mmcompress.data.calibration", "CalibrationSet"),
    "QuantScheme": ("mmcompress.quant.quantizer", "QuantScheme"),
    "load": ("mmcompress.export.serialization", "load"),
    "save": ("mmcompress.export.serialization", "save"),
    "load_model": ("mmcompress.export.serialization", "load_model"),
    "quantize": ("mmcompress.quant.api", "quantize"),
    "sparsify": ("mmcompress.sparse.api", "sparsify"),
    "apply_recipe": ("mmcompress.recipe", "apply_recipe"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmcompress' has no attribute {name!r}")
