#!/usr/bin/env bash
# One prepared GPU session (device tool): the gpu-marked tests (Triton kernels, the integer runtime on
# CUDA), the Triton kernels' checks and benchmarks, and the CUDA paths of the calibration pipeline.
# Run from the repo root on a CUDA machine (the device image's own python3, torch and triton; nothing is
# installed); logs and JSON go under $OUT (default ./device_out).  About 5.7 minutes at most.
set -o pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
# the tests' conftest needs the package's entry points: a dist-info beside src/ on the path, no pip
shim=$(mktemp -d); mkdir -p "$shim/mmcompress-0.0.dist-info"
printf 'Metadata-Version: 2.1\nName: mmcompress\nVersion: 0.0\n' > "$shim/mmcompress-0.0.dist-info/METADATA"
printf '[mmcompress.plugins]\ntestbed = mmcompress_testbed.plugin\n' > "$shim/mmcompress-0.0.dist-info/entry_points.txt"
export PYTHONPATH=$PWD/src:$shim PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# the CPU side of the comparisons takes torch's path: no C++ build on the device machine
MMCOMPRESS_NO_CPU_KERNEL=1 timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_cuda_runtime.py \
  -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest_gpu.log"
timeout 120 python3 benchmarks/gpu_check.py --budget-s 90 --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
timeout 70 python3 benchmarks/gpu_paths.py 2>&1 | tee "$OUT/gpu_paths.log"
echo "device_check done"
