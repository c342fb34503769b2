#!/usr/bin/env bash
# Build llama.cpp (llama-cpp-python from PyPI, compiled here with this machine's cmake and C++ compiler,
# about 6 minutes on 2 cores) in its own venv, and unpack its source distribution next to it for
# convert_hf_to_gguf.py.  Usage: bash benchmarks/llamacpp_env.sh [DIR]   (default .venv-llamacpp)
set -euo pipefail
VERSION=0.3.36
DIR=${1:-.venv-llamacpp}
python3 -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --upgrade pip
# the source distribution (convert_hf_to_gguf.py and gguf-py live in it)
"$DIR/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$DIR/sdist" "llama-cpp-python==$VERSION"
mkdir -p "$DIR/src" && tar xzf "$DIR"/sdist/llama_cpp_python-$VERSION.tar.gz -C "$DIR/src"
CMAKE_ARGS="-DGGML_NATIVE=ON" "$DIR/bin/python" -m pip install -q "llama-cpp-python==$VERSION"
# what convert_hf_to_gguf.py imports (CPU torch: an unpinned torch would pull a CUDA build)
"$DIR/bin/python" -m pip install -q torch==2.13.0 "transformers>=4.45" sentencepiece safetensors numpy
"$DIR/bin/python" -m pip install -q "$DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
echo "$DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
