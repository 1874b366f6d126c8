#!/usr/bin/env bash
# The README's test command (and what CI runs): set up, fetch + convert the default model pair (once; the
# real-pair integration tests use it), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/cascade fetch-models
exec .venv/bin/python -m pytest -q -rs "$@"
