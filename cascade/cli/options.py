"""The options several subcommands share, defined once: the model pair (``--draft``, ``--target``,
``--device``, ``--dtype``, ``--max-len``), a target served by vLLM, the policy (``--policy`` and its
parameter shortcuts), sampling, and the datasets of the benchmark commands. Each ``add_*`` adds a group
to a subparser; each ``*_from_args`` reads it back."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Iterable

from cascade.config import SamplingParams
from cascade.defaults import default_policy
from cascade.models.backend import BACKENDS
from cascade.policies import make_policy, parse_policy, parse_value, policy_names

DTYPES = ["auto", "float32", "bfloat16", "float16"]


def add_model_options(p: argparse.ArgumentParser, *, target: bool = True, dtype_default: str = "auto",
                      dtype_help: str | None = None, llamacpp: bool = True) -> None:
    """--draft, --target (with the vLLM target options), --device, --dtype, --max-len, and (``llamacpp``) the
    default pair's --backend and the llama.cpp runner's --llamacpp-threads."""
    p.add_argument("--draft", default=None,
                   help="draft model: a local HF checkpoint dir, a repo id in the local Hugging Face cache, or a "
                        "known name (default: the default pair); a .gguf file or 'llama.cpp:<name, dir or file>' runs it "
                        "on llama.cpp as it ships ('llama.cpp:' alone: the default pair's draft, after cascade "
                        "fetch-models --backend llama.cpp; needs the llamacpp extra)")
    if target:
        add_target_options(p)
    else:
        p.add_argument("--target", default=None, help="target model dir, cached repo id or name (default: the default "
                                                      "pair); a .gguf file or 'llama.cpp:<...>' runs it on llama.cpp")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N; auto = CUDA when present, else the CPU (default: auto)")
    p.add_argument("--dtype", default=dtype_default, choices=DTYPES,
                   help=dtype_help or "weights/activations dtype; auto = bf16 on CUDA, on CPU bf16 where the CPU has "
                                      "fast bf16 (avx512_bf16 / AMX) else fp32 (default: auto)")
    p.add_argument("--max-len", type=int, default=2048, help="KV-cache positions per request: prompt + answer (default: 2048)")
    if llamacpp:
        p.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="runner of the default pair (the models --draft / --target leave unnamed): 'torch' = "
                            "cascade's runner on the converted safetensors; 'llama.cpp' = the GGUFs as they ship "
                            "(cascade fetch-models --backend llama.cpp); auto = llama.cpp on a CPU when its bindings "
                            "and both GGUFs are there and --dtype is auto, else torch (default: auto)")
        p.add_argument("--llamacpp-threads", type=int, default=None, metavar="N",
                       help="threads of a model run on llama.cpp (a .gguf / llama.cpp: draft or target; default: every "
                            "CPU)")


def add_target_options(p: argparse.ArgumentParser) -> None:
    """--target and the options of a target served by vLLM."""
    p.add_argument("--target", default=None,
                   help="target model: a local HF checkpoint dir, a cached repo id or a known name (default: the "
                        "default pair); 'vllm:<dir or name>' loads it into an in-process vLLM engine instead (needs "
                        "the vllm extra); a .gguf file or 'llama.cpp:<name, dir or file>' runs it on llama.cpp as it "
                        "ships ('llama.cpp:' alone: the default pair's target); with --target-url it is only read for "
                        "its config.json (cost accounting)")
    p.add_argument("--target-url", default=None, metavar="URL", action="append",
                   help="use the target served by a running vLLM OpenAI server at URL (e.g. http://gpu-box:8000); "
                        "the draft stays local and only escalated spans travel. Repeat it for replicas: target passes "
                        "go round-robin, and a replica that fails is skipped while the others serve")
    p.add_argument("--target-model", default=None, help="with --target-url: the served model name (default: the server's first)")
    p.add_argument("--target-api-key", default=None, metavar="KEY",
                   help="with --target-url: the key the vLLM server was started with (vllm serve --api-key); "
                        "default: $CASCADE_TARGET_API_KEY")
    p.add_argument("--on-target-error", default="fail", choices=["fail", "draft-only"],
                   help="when the vLLM target cannot be reached: fail the affected requests (HTTP 503), or keep "
                        "their drafted tokens unverified and go on draft-only (default: fail)")
    p.add_argument("--target-timeout", type=float, default=30.0, help="with --target-url: seconds per HTTP call (default: 30)")
    p.add_argument("--target-retries", type=int, default=2, help="with --target-url: retries after a failed call (default: 2)")
    p.add_argument("--target-cooldown", type=float, default=5.0,
                   help="with --target-url: after a call fails every try, seconds during which the target is treated "
                        "as down without calling it (default: 5)")
    p.add_argument("--target-logprobs", type=int, default=20,
                   help="vLLM target: top-k log-probs per position; the target acts as its top-k truncation, exact "
                        "for greedy speculative/chow (default: 20, vLLM's max_logprobs); -1: whole rows, exact for every "
                        "policy (a `cascade target-serve --max-logprobs -1` server, or an in-process vLLM target)")
    p.add_argument("--vllm-memory-fraction", type=float, default=None,
                   help="'vllm:' target: share of the GPU's total memory (of RAM on vLLM's CPU backend) vLLM reserves "
                        "(default on a GPU: what is free once the draft is loaded, less 1 GiB or 5 %% kept for the "
                        "draft, at most 0.9; on the CPU backend: vLLM's)")
    p.add_argument("--vllm-tensor-parallel", type=int, default=1, help="'vllm:' target: GPUs to split the target over (default: 1)")
    p.add_argument("--exact-verify", action="store_true",
                   help="batch-invariant target: every target call is the one batch-1 target-only decoding makes (the "
                        "prompt alone, then one token of one sequence per call): greedy speculative == batch-1 "
                        "target-only token for token in any dtype at any batch, at the cost of a sequential "
                        "verification (in-process target only)")


def pair_kwargs(args: argparse.Namespace) -> dict:
    """Cascade.from_pretrained keyword arguments for ``add_model_options`` (the target options included)."""
    import os

    kwargs = {"device": args.device, "dtype": args.dtype, "max_len": args.max_len}
    if args.max_len < 8:
        raise ValueError(f"--max-len: must be >= 8, got {args.max_len}")
    threads = getattr(args, "llamacpp_threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--llamacpp-threads: must be >= 1, got {threads}")
        kwargs["llamacpp"] = {"threads": threads}
    if hasattr(args, "backend"):
        kwargs["backend"] = args.backend
    if not hasattr(args, "target_url"):
        return kwargs
    uses_vllm = args.target_url is not None or (args.target or "").startswith("vllm:")
    if not uses_vllm:
        return {**kwargs, "exact_verify": args.exact_verify}
    from cascade.models.vllm import RemotePolicy, VLLMTargetOptions

    remote = RemotePolicy(timeout_s=args.target_timeout, retries=args.target_retries, cooldown_s=args.target_cooldown)
    options = VLLMTargetOptions(served_model=args.target_model, logprobs=args.target_logprobs, remote=remote,
                                memory_fraction=args.vllm_memory_fraction,
                                tensor_parallel_size=args.vllm_tensor_parallel,
                                api_key=args.target_api_key or os.environ.get("CASCADE_TARGET_API_KEY"))
    return {**kwargs, "target_url": args.target_url, "vllm_options": options, "on_target_error": args.on_target_error}


# ---------------------------------------------------------------------- policy
def add_policy_options(p: argparse.ArgumentParser, *, what: str = "cascade policy") -> None:
    """--policy and the shortcuts for its parameters (--alpha, --k, --fallback, --rollback, --param)."""
    p.add_argument("--policy", default=None,
                   help=f"{what}: one of {', '.join(policy_names())}; may carry parameters, e.g. 'chow(alpha=0.2)' "
                        "or 'chow:0.2' (default: the calibrated default shipped with the project, see "
                        "`cascade calibrate --ship`)")
    p.add_argument("--alpha", type=float, default=None, help="chow's threshold: escalate where draft max-prob < 1 - alpha")
    p.add_argument("--k", type=int, default=None, help="draft block length (tokens proposed per round)")
    p.add_argument("--fallback", type=float, default=None, help="bild: stop drafting where draft max-prob < fallback")
    p.add_argument("--rollback", type=float, default=None, help="bild: reject draft tokens whose target cross-entropy exceeds this")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="any other policy parameter (repeatable)")


def policy_from_args(args: argparse.Namespace, default: str | None = None):
    """The policy named by --policy (else ``default``, else the shipped default), with
    --alpha/--k/--fallback/--rollback/--param applied on top."""
    extra = {name: getattr(args, name) for name in ("alpha", "k", "fallback", "rollback") if getattr(args, name) is not None}
    for item in args.param or []:
        if "=" not in item:
            raise ValueError(f"--param {item!r} must be written name=value")
        key, value = item.split("=", 1)
        extra[key.strip()] = parse_value(value)
    base = parse_policy(args.policy or default or default_policy())
    return make_policy(base.name, **{**{f.name: getattr(base, f.name) for f in fields(base)}, **extra}) if extra else base


def has_policy_options(args: argparse.Namespace) -> bool:
    return any(getattr(args, n, None) is not None for n in ("alpha", "k", "fallback", "rollback", "param"))


# ---------------------------------------------------------------------- sampling
def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=512,
                   help="tokens to generate at most per prompt (default: 512, enough for the built-in answers to finish)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0 = off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than min-p x the most likely one (default: 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: fresh entropy)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, seed=args.seed, stop=tuple(args.stop or ()))


# ---------------------------------------------------------------------- datasets (bench, calibrate, train-router)
def add_dataset_options(p: argparse.ArgumentParser, *, default_names: str, limit: int, limit_help: str = "") -> None:
    p.add_argument("--dataset", action="append", default=None, metavar="NAME|PATH",
                   help=f"humaneval, gsm8k, math500 or a JSONL task file (repeatable; default: {default_names}). MBPP is "
                        "reserved for checking that calibration transfers: do not tune on it")
    p.add_argument("--limit", type=int, default=limit,
                   help=limit_help or f"problems per dataset, a seeded sample (default: {limit}; 0 = all)")
    p.add_argument("--dataset-limit", action="append", default=None, metavar="NAME=N",
                   help="problems for one dataset, overriding --limit (repeatable), e.g. gsm8k=40")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem sample and the split (default: 0)")
    p.add_argument("--dev-fraction", type=float, default=0.5,
                   help="share of each dataset's problems in the dev split, where parameters are chosen; the rest is "
                        "the test split the figures are reported on (default: 0.5)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options of the benchmark commands that run the pair: rows, cache, progress."""
    p.add_argument("--batch-size", type=int, default=8, help="engine rows (concurrent requests) in real runs (default: 8)")
    p.add_argument("--cache-dir", default=None, help="generation cache (default: $CASCADE_HOME/bench-cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def dataset_limits(items: Iterable[str] | None) -> dict:
    """--dataset-limit NAME=N items -> {name: N or None (0 = all)}."""
    limits = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--dataset-limit {item!r} must be written NAME=N")
        limits[name.strip()] = int(value) or None
    return limits


BENCH_DTYPE_HELP = ("both models' dtype (default: float32: teacher-forced and incremental passes then round alike, so "
                    "replay is exact and lossless is token-exact; auto = the runner's per-device choice)")
