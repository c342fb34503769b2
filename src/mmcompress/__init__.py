"""mmcompress: post-training compression for LLMs and multimodal LLMs.

Public API::

    model = mmcompress.load_model("path/to/hf-dir")
    calib = mmcompress.CalibrationSet.from_text_file("wiki.txt", tokenizer, nsamples=128, seqlen=512)
    mmcompress.quantize(model, calib, method="smoothquant", scheme="w8a8")
    mmcompress.save(model, "out/")
    model = mmcompress.load("out/")
"""

__version__ = "0.1.0"

from .data.calibration import CalibrationSet  # noqa: E402
from .export.serialization import load, save  # noqa: E402
from .models.loading import load_hf_model as load_model  # noqa: E402
from .quant.api import quantize  # noqa: E402
from .quant.quantizer import QuantScheme  # noqa: E402

__all__ = ["__version__", "CalibrationSet", "QuantScheme", "load", "load_model", "quantize", "save"]
