#!/usr/bin/env bash
# Builds llama.cpp's own benchmark tools, `llama-bench` and `llama-speculative`, from the llama.cpp source that
# the pinned llama-cpp-python sdist vendors: the very llama.cpp the llama.cpp runner calls, so
# benchmarks/speed.py --llamacpp compares our engine with llama.cpp's own figures on the same code and flags.
# Output: $CASCADE_HOME/llama-tools/bin (default ~/.cache/cascade/llama-tools/bin); a second run returns at once.
# Usage: bash scripts/build_llama_tools.sh        (minutes on 2 cores; run nothing heavy beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="0.3.36"   # keep equal to the llamacpp extra's pin in pyproject.toml
HOME_DIR="${CASCADE_HOME:-$HOME/.cache/cascade}"
OUT="$HOME_DIR/llama-tools"
if [ -x "$OUT/bin/llama-bench" ] && [ -x "$OUT/bin/llama-speculative" ] && [ "$(cat "$OUT/version" 2>/dev/null)" = "$VERSION" ]; then
  echo "[llama-tools] up to date: $OUT/bin"
  exit 0
fi
PY="${PYTHON:-.venv/bin/python}"
WORK="$OUT/src"
rm -rf "$WORK" && mkdir -p "$WORK"
echo "[llama-tools] fetching the llama-cpp-python $VERSION sdist"
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
tar xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
echo "[llama-tools] building llama-bench and llama-speculative from $SRC"
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$WORK/build" --target llama-bench llama-speculative -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
mkdir -p "$OUT/bin"
cp "$WORK/build/bin/llama-bench" "$WORK/build/bin/llama-speculative" "$OUT/bin/"
echo "$VERSION" > "$OUT/version"
rm -rf "$WORK"
echo "[llama-tools] done: $OUT/bin"
