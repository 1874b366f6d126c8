"""``cascade target-serve``: the target alone, serving verifications to cascade front ends on other machines
(``cascade serve --target-url``), an escalation costing its new positions (``cascade.target_server``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from cascade.cli.options import DTYPES
from cascade.cli.serve import missing_server_modules
from cascade.models.factory import VLLM_PREFIX

VERIFY_MIDDLEWARE = "cascade.target_server.vllm_route.verify_middleware"


def add_parser(sub) -> None:
    v = sub.add_parser(
        "target-serve", help="serve the target's verifications to remote cascade front ends (--target-url)",
        description="Serve the target model's verify endpoint (POST /cascade/v1/verify: token ids in, log-probs at "
                    "the positions asked for out, the prefix cache read) for `cascade serve --target-url`, so a "
                    "remote escalation costs its new positions, not a prefill of the whole sequence. With --target "
                    "vllm:DIR it starts vLLM's OpenAI server (its engine, scheduler, paged attention, prefix "
                    "caching; vLLM's own routes served as usual) with the endpoint added as a middleware; otherwise "
                    "the project's runner serves it, its cache rows used as a prefix cache.",
        epilog="Arguments after '--' go to `vllm serve` unchanged (vllm: targets only), e.g. -- --tensor-parallel-size 2")
    v.add_argument("--target", default=None,
                   help="the model: a checkpoint dir or known name (default: the default pair's target) on the "
                        "project's runner, or 'vllm:<dir or name>' on vLLM (needs the vllm extra)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    v.add_argument("--port", type=int, default=8100, help="port to listen on (default: 8100)")
    v.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 and /cascade routes (front ends pass it with "
                        "--target-api-key); default: $CASCADE_TARGET_API_KEY, or no key")
    v.add_argument("--served-model-name", default="target", help="the model name clients see (default: target)")
    v.add_argument("--max-rows", type=int, default=16,
                   help="project runner: cache rows = sequences held for prefix reuse, and the most scored in one "
                        "pass (default: 16; give at least the front ends' --max-rows together)")
    v.add_argument("--max-len", type=int, default=2048, help="positions per sequence (default: 2048)")
    v.add_argument("--device", default="auto", help="project runner: cpu, cuda or cuda:N (default: auto)")
    v.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (default: auto; vLLM's 'auto' on vLLM)")
    v.add_argument("--max-logprobs", type=int, default=20,
                   help="the largest top-k a call may ask for; -1 also allows whole rows (exact for every policy; "
                        "on vLLM this sets its --max-logprobs and a whole row is V floats a position) (default: 20)")
    v.add_argument("--vllm-memory-fraction", type=float, default=None,
                   help="vllm: target: vLLM's --gpu-memory-utilization (share of RAM on its CPU backend)")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: info)")
    v.set_defaults(handler=run)


def vllm_command(args: argparse.Namespace, model_dir: str, extra: list[str]) -> list[str]:
    """The ``vllm serve`` command line that serves ``model_dir`` with the verify middleware."""
    import torch

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", args.served_model_name, "--host", args.host, "--port", str(args.port),
           "--max-model-len", str(args.max_len), "--enable-prefix-caching", "--max-logprobs", str(args.max_logprobs),
           "--middleware", VERIFY_MIDDLEWARE, "--uvicorn-log-level", args.log_level]
    if args.dtype != "auto":
        cmd += ["--dtype", args.dtype]
    if args.vllm_memory_fraction is not None:
        cmd += ["--gpu-memory-utilization", str(args.vllm_memory_fraction)]
    if not torch.cuda.is_available():
        cmd += ["--block-size", "32"]  # vLLM's CPU default (128) would never hit the cache on short sequences
    return cmd + extra


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the option for values no server could run with."""
    for name, low in (("port", 0), ("max_rows", 1), ("max_len", 8)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= {low}, got {getattr(args, name)}")
    if args.max_logprobs < 1 and args.max_logprobs != -1:
        raise ValueError(f"--max-logprobs: must be >= 1, or -1 for whole rows, got {args.max_logprobs}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    extra = list(getattr(args, "passthrough", None) or [])
    api_key = args.api_key or os.environ.get("CASCADE_TARGET_API_KEY") or None
    target = args.target or ""
    if target.startswith(VLLM_PREFIX):
        from cascade.models.factory import resolve_member

        model_dir = str(resolve_member(target.removeprefix(VLLM_PREFIX) or None, 1))
        cmd = vllm_command(args, model_dir, extra)
        env = dict(os.environ)
        if api_key:
            env["VLLM_API_KEY"] = api_key  # vLLM guards its /v1 routes with it; the middleware reads it too
        print(f"starting vLLM with the verify endpoint: {' '.join(cmd)}", flush=True)
        os.execve(sys.executable, cmd, env)  # vLLM owns the process from here (signals, shutdown)
    if extra:
        raise ValueError(f"arguments after '--' go to vllm serve; this target is on the project's runner: {extra}")
    missing = missing_server_modules()
    if missing:
        raise ValueError(f"target-serve needs the server extra ({', '.join(missing)} not installed): "
                         "pip install 'cascade[server]'")
    from cascade.config import resolve_device, resolve_dtype_name
    from cascade.models.factory import RunnerOptions, local_runner, resolve_member
    from cascade.server import run_server
    from cascade.target_server.app import create_target_app
    from cascade.target_server.runner_scorer import RunnerScorer

    t0 = time.perf_counter()
    options = RunnerOptions(max_rows=args.max_rows, max_len=args.max_len, device=resolve_device(args.device),
                            dtype=resolve_dtype_name(args.dtype))
    runner = local_runner(resolve_member(target or None, 1), options)
    scorer = RunnerScorer(runner, max_top_k=runner.vocab_size if args.max_logprobs == -1 else args.max_logprobs,
                          full_rows=args.max_logprobs == -1)
    app = create_target_app(scorer, served_name=args.served_model_name, api_key=api_key)
    print(f"loaded the target in {time.perf_counter() - t0:.0f} s on {options.device}; verify endpoint on "
          f"http://{args.host}:{args.port}/cascade/v1/verify{' (API key required)' if api_key else ''}", flush=True)
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
