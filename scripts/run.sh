#!/usr/bin/env bash
# The README's run command: set up, fetch + convert the default model pair (once), and show a cascade
# answering a few built-in prompts. Extra arguments go to `cascade generate`, e.g.
#   bash scripts/run.sh "Write a quicksort in Python." --policy chow --alpha 0.2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/cascade fetch-models
exec .venv/bin/cascade generate "$@"
