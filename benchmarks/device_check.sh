#!/usr/bin/env bash
# One prepared GPU session (device tool): Triton kernels (correctness + benchmarks), CUDA paths of the
# calibration pipeline, the gpu-marked tests.  Run from the repo root on a CUDA machine; logs and JSON go
# under $OUT (default ./device_out).  About 7 minutes at most.
set -o pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 220 python3 benchmarks/gpu_check.py --budget-s 170 --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
timeout 110 python3 benchmarks/gpu_paths.py --big --json "$OUT/gpu_paths.json" 2>&1 | tee "$OUT/gpu_paths.log"
timeout 70 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
echo "device_check done"
