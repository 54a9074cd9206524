#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (llama-server: parallel slots, continuous batching) from the llama.cpp sources
# that the installed llama-cpp-python release vendors, so both llama.cpp peers of benchmarks/serve.py are the same
# llama.cpp. Usage: bash benchmarks/build_llama_server.sh [DEST]  (default ~/.cache/qwen-engine/llama-server)
# About 15 minutes on 2 cores. AMX stays off: a native build segfaults in ggml_backend_amx_mul_mat on machines whose
# kernel does not enable AMX for it (see the README).
set -euo pipefail
dest="${1:-$HOME/.cache/qwen-engine/llama-server}"
version="$(python -c 'from importlib.metadata import version; print(version("llama_cpp_python"))')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip download "llama-cpp-python==$version" --no-binary :all: --no-deps -d "$work" --quiet
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
  -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF > /dev/null
cmake --build "$work/build" --target llama-server -j "$(nproc)" > /dev/null
mkdir -p "$dest"
cp "$work/build/bin/llama-server" "$dest/llama-server.partial"
"$dest/llama-server.partial" --version > /dev/null 2>&1  # it runs before it replaces a working one
mv "$dest/llama-server.partial" "$dest/llama-server"
echo "$dest/llama-server (llama.cpp from llama-cpp-python $version)"
