#!/usr/bin/env bash
# Checks hone's GGUF exports with llama.cpp itself (issue: GGUF out). Builds llama.cpp outside the
# repository from the PyPI sdist of llama-cpp-python (it vendors llama.cpp with its tools and
# gguf-py; never vendored into hone), or uses LLAMA_CPP=<llama.cpp tree with build/bin>, then runs
# scripts/llamacpp_check.py (logits of f32/f16 exports vs hone's; rewrites
# fixtures/gguf/export/llamacpp_refs.json, which `cargo test` replays) and, for the K-quants,
# llama-perplexity on hone's export vs llama-quantize's from the same f16 export.
#
#   scripts/llamacpp-check.sh [-w WORKDIR] [-p PYTHON]
# WORKDIR (default /tmp/hone-llamacpp) holds the sdist, the build and a venv with numpy,
# safetensors and cmake (gguf-py comes from the llama.cpp tree). Needs a C++ compiler and the package registry (PyPI).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK=/tmp/hone-llamacpp
PY=python3
while getopts "w:p:" o; do case $o in w) WORK=$OPTARG ;; p) PY=$OPTARG ;; *) exit 2 ;; esac; done
VERSION=0.3.36
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
  "$PY" -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q numpy safetensors cmake tqdm pyyaml requests
fi
export PATH="$WORK/venv/bin:$PATH"
if [ -z "${LLAMA_CPP:-}" ]; then
  SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
  if [ ! -d "$SRC" ]; then
    URL=$(curl -sS https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*llama_cpp_python-$VERSION.tar.gz" | head -1)
    curl -sSLo "$WORK/sdist.tar.gz" "$URL"
    echo "$SHA  $WORK/sdist.tar.gz" | sha256sum -c -
    tar xzf "$WORK/sdist.tar.gz" -C "$WORK"
  fi
  LLAMA_CPP="$SRC"
fi
BIN="$LLAMA_CPP/build/bin"
if [ ! -x "$BIN/llama-debug" ] || [ ! -x "$BIN/llama-perplexity" ] || [ ! -x "$BIN/llama-quantize" ]; then
  cmake -S "$LLAMA_CPP" -B "$LLAMA_CPP/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF > /dev/null
  cmake --build "$LLAMA_CPP/build" -j"$(nproc)" --target llama-debug llama-quantize llama-perplexity llama-cli
fi
HONE="$ROOT/target/release/hone"
[ -x "$HONE" ] || (cd "$ROOT" && cargo build --release -p hone-cli)
# gguf-py as the llama.cpp tree vendors it (reads the files for the tensor comparisons).
PYTHONPATH="$LLAMA_CPP/gguf-py${PYTHONPATH:+:$PYTHONPATH}" LLAMA_BIN="$BIN" HONE="$HONE" \
  "$WORK/venv/bin/python" "$ROOT/scripts/llamacpp_check.py"
