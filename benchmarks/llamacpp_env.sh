#!/usr/bin/env bash
# Build llama.cpp (llama-cpp-python from PyPI, compiled here with this machine's cmake and C++ compiler,
# about 6-12 minutes on 2 cores) in its own venv, and unpack its source distribution next to it for
# convert_hf_to_gguf.py.  Usage: bash benchmarks/llamacpp_env.sh [DIR]   (default .venv-llamacpp)
#
# The build is -march=native (GGML_NATIVE=ON: AVX2/AVX-512/VNNI/BF16 as the CPU has them, and the Q4_0
# interleaved repack) WITHOUT AMX: on a CPU with AMX, -march=native compiles in ggml's AMX extra buffer
# type, and in 0.3.36 that segfaults on Q8_0 and Q4_0 models (ggml_backend_amx_mul_mat, docs/runtime.md).
# LLAMACPP_AMX=1 keeps AMX (to retry it on a later version).  The flags and llama.cpp's own
# system-info line are written to DIR/build-info.txt.
set -euo pipefail
VERSION=0.3.36
DIR=${1:-.venv-llamacpp}
python3 -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --upgrade pip
# the source distribution (convert_hf_to_gguf.py and gguf-py live in it; the build below compiles it)
"$DIR/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$DIR/sdist" "llama-cpp-python==$VERSION"
mkdir -p "$DIR/src" && tar xzf "$DIR"/sdist/llama_cpp_python-$VERSION.tar.gz -C "$DIR/src"
NOAMX=""
if [ "${LLAMACPP_AMX:-0}" != 1 ] && [ "$(uname -m)" = x86_64 ] \
        && echo | "${CC:-cc}" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -E - >/dev/null 2>&1; then
    NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # gcc/clang: an explicit -mno-* wins over -march=native
fi
# --no-cache-dir: pip would otherwise reuse a wheel it built earlier with other flags
CFLAGS="${CFLAGS:-} $NOAMX" CXXFLAGS="${CXXFLAGS:-} $NOAMX" CMAKE_ARGS="-DGGML_NATIVE=ON" \
    "$DIR/bin/python" -m pip install -q --no-cache-dir "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz"
{ echo "llama-cpp-python $VERSION  CMAKE_ARGS=-DGGML_NATIVE=ON  CFLAGS/CXXFLAGS+=${NOAMX:-(none)}"
  "$DIR/bin/python" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
} | tee "$DIR/build-info.txt" >&2
# what convert_hf_to_gguf.py imports (CPU torch: an unpinned torch would pull a CUDA build)
"$DIR/bin/python" -m pip install -q torch==2.13.0 "transformers>=4.45" sentencepiece safetensors numpy
"$DIR/bin/python" -m pip install -q "$DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
echo "$DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
