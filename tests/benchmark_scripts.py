"""Import a script of ``benchmarks/`` as a module, for tests of its bookkeeping (the scripts import their
siblings, ``machine``, ``prompts``, ``serve_load``, by plain name, so the folder is on the path while it loads)."""

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
