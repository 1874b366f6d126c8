"""Greedy output of every policy on the real pair, recorded so two versions of the code can be compared token for
token: the check that a refactor of the round (issue 30) changed no behaviour.

Record with each version of the code (the checkout on ``PYTHONPATH`` decides which runs), then compare:

    PYTHONPATH=/tmp/before .venv/bin/python benchmarks/greedy_identity.py record --out /tmp/before.json
    .venv/bin/python benchmarks/greedy_identity.py record --out /tmp/after.json
    .venv/bin/python benchmarks/greedy_identity.py compare /tmp/before.json /tmp/after.json

``record`` runs every runnable policy at its default parameters, greedy, on the first problems of the bench's
datasets (HumanEval, GSM8K, MATH-500: their chat prompts, as ``cascade bench`` sends them), in one batch, and
writes each request's token ids, each token's source and the engine's counters. ``compare`` prints, per policy,
whether both recordings agree on every token, source and counter, and exits 1 where one differs. A policy the
pair cannot run (``learned`` without a trained router) is recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STATS = ("draft_tokens", "target_tokens", "escalations", "accepted_tokens", "target_scored_tokens")


def record(args: argparse.Namespace) -> None:
    from cascade import Cascade, SamplingParams
    from cascade.bench.datasets import load_gsm8k, load_humaneval, load_math500
    from cascade.policies import policy_names

    problems = []
    for load in (load_humaneval, load_gsm8k, load_math500):
        problems += load()[: args.problems]
    prompts = [p.as_prompt() for p in problems]
    names = args.policies.split(",") if args.policies else policy_names(runnable=True) if _takes_runnable() else \
        [n for n in policy_names() if n not in ("oracle",)]
    t0 = time.perf_counter()
    cascade = Cascade.from_pretrained(max_rows=args.batch, max_len=args.max_len, dtype="float32")
    print(f"loaded the pair in {time.perf_counter() - t0:.0f} s; {len(prompts)} problems, {len(names)} policies",
          file=sys.stderr, flush=True)
    out: dict = {"problems": [f"{p.dataset}/{p.problem_id}" for p in problems], "max_tokens": args.max_tokens,
                 "policies": {}}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    for name in names:
        t0 = time.perf_counter()
        try:
            results = cascade.generate(prompts, params, policy=name)
        except ValueError as e:  # e.g. a policy that needs a router this pair lacks
            out["policies"][name] = {"skipped": str(e)}
            print(f"{name:>12}: skipped ({e})", file=sys.stderr, flush=True)
            continue
        out["policies"][name] = {
            "token_ids": [list(r.token_ids) for r in results],
            "sources": [[int(s) for s in r.token_sources] for r in results],
            "stats": [{k: getattr(r.stats, k) for k in STATS} for r in results],
        }
        print(f"{name:>12}: {sum(len(r.token_ids) for r in results)} tokens in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(out))


def _takes_runnable() -> bool:
    import inspect

    from cascade.policies import policy_names

    return "runnable" in inspect.signature(policy_names).parameters


def compare(args: argparse.Namespace) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    if a["problems"] != b["problems"] or a["max_tokens"] != b["max_tokens"]:
        raise SystemExit("the two recordings ran different problems or max_tokens")
    differ = 0
    for name in sorted(set(a["policies"]) | set(b["policies"])):
        pa, pb = a["policies"].get(name), b["policies"].get(name)
        if pa is None or pb is None or "skipped" in pa or "skipped" in pb:
            print(f"{name:>12}: not in both ({'missing' if pa is None or pb is None else 'skipped'})")
            continue
        tokens = sum(len(t) for t in pa["token_ids"])
        bad = [i for i in range(len(a["problems"]))
               if any(pa[f][i] != pb[f][i] for f in ("token_ids", "sources", "stats"))]
        differ += bool(bad)
        verdict = "identical" if not bad else f"DIFFERS on {len(bad)} problems, first {a['problems'][bad[0]]}"
        print(f"{name:>12}: {len(a['problems'])} problems, {tokens} tokens: {verdict}")
    sys.exit(1 if differ else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="record every policy's greedy output with the code on PYTHONPATH")
    r.add_argument("--out", required=True, help="JSON file to write")
    r.add_argument("--problems", type=int, default=4, help="first problems of each dataset (default: 4)")
    r.add_argument("--max-tokens", type=int, default=96, help="tokens per answer (default: 96)")
    r.add_argument("--batch", type=int, default=12, help="engine rows (default: 12, every problem at once)")
    r.add_argument("--max-len", type=int, default=1024, help="cache positions per row (default: 1024)")
    r.add_argument("--policies", default=None, help="comma-separated policy names (default: every runnable one)")
    c = sub.add_parser("compare", help="compare two recordings; exit 1 where a policy's output differs")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    record(args) if args.command == "record" else compare(args)


if __name__ == "__main__":
    main()
