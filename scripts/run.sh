#!/usr/bin/env bash
# The README's run command: set up, fetch the default model pair (once), and show a cascade answering a few
# built-in prompts. On a machine without an NVIDIA GPU the pair runs on llama.cpp, its GGUFs as they ship (the set-up
# builds llama.cpp's bindings once, ~5 min on 2 cores; no 10 GB conversion); on a GPU machine it is converted for
# cascade's torch runner. Extra arguments go to `cascade generate`, e.g.
#   bash scripts/run.sh "Write a quicksort in Python." --policy chow --alpha 0.2
#   bash scripts/run.sh --backend torch          (the fp32 runner: run `cascade fetch-models --backend torch` first)
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  bash scripts/setup.sh dev
else
  bash scripts/setup.sh dev,llamacpp
fi
.venv/bin/cascade fetch-models                     # --backend auto: llama.cpp's GGUFs on a CPU, torch's on a GPU
exec .venv/bin/cascade generate "$@"
