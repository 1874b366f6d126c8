"""``cascade serve``: the pair behind an OpenAI-compatible HTTP API (``cascade.server``)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cascade.cli.options import add_model_options, pair_kwargs
from cascade.policies import parse_policy

SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client", "pydantic")


def add_parser(sub) -> None:
    v = sub.add_parser("serve", help="serve the pair behind an OpenAI-compatible HTTP API",
                       description="Serve /v1/chat/completions, /v1/completions (SSE with stream=true), /v1/models, "
                                   "/health and /metrics (Prometheus). Requests join and leave the running batch "
                                   "between rounds; beyond --max-rows they queue, beyond --max-queue they get 429. "
                                   "A request picks its policy with the model name 'cascade:<policy>' (e.g. "
                                   "'cascade:chow:0.2') or the body field \"cascade\": {\"policy\": \"chow\", "
                                   "\"alpha\": 0.2}; the model name 'cascade' runs --policy. Fields the server cannot "
                                   "honour are refused with a 400 naming them, never ignored (README, API).")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    v.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    v.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1 route (401 otherwise; /health and /metrics "
                        "stay open); default: $CASCADE_API_KEY, or no key")
    v.add_argument("--policy", default=None,
                   help="default policy for requests that name none, e.g. 'chow(alpha=0.2)' or 'chow:0.2' (default: "
                        "the calibrated default shipped with the project, see `cascade calibrate --ship`)")
    v.add_argument("--calibration", default=None, metavar="JSON",
                   help="use the policy chosen by `cascade calibrate` (its JSON summary) as the default policy")
    v.add_argument("--served-model-name", default="cascade", help="model name clients send (default: cascade)")
    v.add_argument("--max-rows", type=int, default=8, help="requests decoded at once = KV-cache rows per model (default: 8)")
    v.add_argument("--fixed-k", action="store_true",
                   help="lossless requests (speculative) always draft their policy's k; by default each round's block "
                        "length is chosen from measured costs, down to no speculation when the target alone is faster "
                        "(dynamic speculation: output unchanged, speed only), its cost model seeded at start-up by a "
                        "profile of both models at every batch bucket (seconds on a CPU)")
    v.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the rows before 429 (default: 64)")
    v.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens of a request that gives none, cut to the room the prompt leaves (default: 256)")
    add_model_options(v)
    v.add_argument("--drain-timeout", type=float, default=30.0,
                   help="at shutdown, seconds to let requests in flight finish before cancelling them (default: 30)")
    v.add_argument("--keepalive", type=float, default=10.0,
                   help="seconds without a chunk after which a stream gets an SSE comment, so proxies keep it (default: 10)")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")
    v.set_defaults(handler=run)


def missing_server_modules() -> list[str]:
    """The server's dependencies that are not installed (the ``server`` extra brings them)."""
    import importlib.util

    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def run(args: argparse.Namespace) -> int:
    missing = missing_server_modules()
    if missing:
        raise ValueError(f"serve needs the server extra ({', '.join(missing)} not installed): "
                         "pip install 'cascade[server]'")
    from cascade.library import Cascade
    from cascade.models.backend import runner_label
    from cascade.server import create_app, run_server

    if args.policy and args.calibration:
        raise ValueError("--policy and --calibration: give one, not both")
    policy = args.policy
    if args.calibration:
        try:
            policy = json.loads(Path(args.calibration).read_text())["policy"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"--calibration: cannot read a policy from {args.calibration!r}: {exc}") from None
    if policy is not None:
        parse_policy(policy)  # a bad policy fails before the models load
    for name in ("port", "max_rows", "max_len", "default_max_tokens"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: must be >= {0 if name == 'port' else 1}")
    if args.keepalive <= 0:
        raise ValueError(f"--keepalive: must be > 0 seconds, got {args.keepalive}")
    api_key = args.api_key or os.environ.get("CASCADE_API_KEY") or None
    t0 = time.perf_counter()
    cascade = Cascade.from_pretrained(args.draft, args.target, max_rows=args.max_rows, adaptive_k=not args.fixed_k,
                                      **pair_kwargs(args))
    policy = parse_policy(policy or cascade.default_policy())
    print(f"loaded the pair in {time.perf_counter() - t0:.0f} s on {cascade.engine.config.device} (draft "
          f"{runner_label(cascade.draft)}, target {runner_label(cascade.target)})"
          f"{'' if args.fixed_k else ' (with the dynamic-speculation profile)'}; default policy "
          f"{policy.describe()}; serving on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    app = create_app(cascade, default_policy=policy, served_name=args.served_model_name, max_queue=args.max_queue,
                     default_max_tokens=args.default_max_tokens, drain_timeout_s=args.drain_timeout,
                     api_key=api_key, keepalive_s=args.keepalive)
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
