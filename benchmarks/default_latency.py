"""The shipped default's latency at batch 1, measured beside draft-only and target-only in the same run.

Question (issue 31's shipped-default goal): does the default policy stream, that is, is its time to first token
within 1.5x of draft-only's, and is its end-to-end latency below target-only's, at batch 1? And what quality and
target FLOPs does it give on the same requests? The bench's cached runs cannot answer it: they were generated
at batch 8-32 and at other times. This script answers a fixed set of requests (the first ``--per-dataset`` test
problems of each dataset's seed-0 split, the split ``cascade calibrate`` reports on) one at a time (the engine
has one row), each problem under every policy back to back, the order rotating by one per problem, so that the
host's drift (``benchmarks/machine.py``) falls on every policy alike. Nothing is cached: every answer is
generated here (a throwaway cache).

Time to first token runs from the request's admission to its first reported token (a request-level router
reports nothing until it has decided: ``cascade.bench.runs``); latency from admission to the last token. The
ratios are ratios of means over the same problems (TTFT / draft-only's, latency / target-only's, target
positions / target-only's), with 95 % paired bootstrap intervals over problems.

Writes ``<tag>.csv`` (per dataset and policy), ``<tag>_requests.csv`` (every request), ``<tag>.png`` and
``<tag>_machine.json`` to benchmarks/results/.

    .venv/bin/python benchmarks/default_latency.py                       # the default vs the baselines, 10 per dataset
    .venv/bin/python benchmarks/default_latency.py --policies "draft-only,target-only,default,quantile(tau=-1.66, quantile=0)"
    .venv/bin/python benchmarks/default_latency.py --quick               # smoke test: 1 HumanEval problem, 8 tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
from pathlib import Path

from machine import machine_info, memory_bandwidth_gb_s
from serve_load import rotated, write_rows

DATASET_LIMITS = {"humaneval": 164, "gsm8k": 256, "math500": 128}  # the samples the shipped default was calibrated on


def ratio_interval(num: list[float], den: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """sum(num) / sum(den) over paired problems, and its 95 % percentile bootstrap interval (problems resampled)."""
    if not num or sum(den) <= 0:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    n, stats = len(num), []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        d = sum(den[i] for i in idx)
        if d > 0:
            stats.append(sum(num[i] for i in idx) / d)
    stats.sort()
    return sum(num) / sum(den), stats[int(0.025 * len(stats))], stats[min(len(stats) - 1, int(0.975 * len(stats)))]


def summarise(rows: list[dict], policies: list[str]) -> list[dict]:
    """Per dataset (and "all") and policy: quality, mean TTFT / latency, and the paired ratios."""
    out = []
    for ds in list(dict.fromkeys(r["dataset"] for r in rows)) + ["all"]:
        mine = [r for r in rows if ds == "all" or r["dataset"] == ds]
        by = {p: {(r["dataset"], r["problem_id"]): r for r in mine if r["policy"] == p} for p in policies}
        keys = [k for k in by[policies[0]] if all(k in by[p] for p in policies)]
        for p in policies:
            own = [by[p][k] for k in keys]
            draft = [by["draft-only"][k] for k in keys] if "draft-only" in by else []
            target = [by["target-only"][k] for k in keys] if "target-only" in by else []
            ttft = ratio_interval([r["ttft_s"] for r in own], [r["ttft_s"] for r in draft]) if draft else (float("nan"),) * 3
            lat = ratio_interval([r["latency_s"] for r in own], [r["latency_s"] for r in target]) if target else (float("nan"),) * 3
            flops = ratio_interval([r["target_positions"] for r in own], [r["target_positions"] for r in target]) \
                if target else (float("nan"),) * 3
            out.append({"dataset": ds, "policy": p, "n": len(own),
                        "quality": round(statistics.fmean(r["correct"] for r in own), 4) if own else float("nan"),
                        "ttft_s": round(statistics.fmean(r["ttft_s"] for r in own), 3) if own else float("nan"),
                        "latency_s": round(statistics.fmean(r["latency_s"] for r in own), 3) if own else float("nan"),
                        "ttft_vs_draft": round(ttft[0], 3), "ttft_lo95": round(ttft[1], 3), "ttft_hi95": round(ttft[2], 3),
                        "latency_vs_target": round(lat[0], 3), "latency_lo95": round(lat[1], 3), "latency_hi95": round(lat[2], 3),
                        "target_fraction": round(flops[0], 4), "target_fraction_lo95": round(flops[1], 4),
                        "target_fraction_hi95": round(flops[2], 4),
                        "hit_max_tokens": sum(r["finish_reason"] == "length" for r in own)})
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    policies = list(dict.fromkeys(s["policy"] for s in summary))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(policies)
    for ax, key, lo, hi, label in ((axes[0], "ttft_vs_draft", "ttft_lo95", "ttft_hi95", "time to first token / draft-only's"),
                                   (axes[1], "latency_vs_target", "latency_lo95", "latency_hi95", "latency / target-only's")):
        for n, p in enumerate(policies):
            rows = [next(s for s in summary if s["dataset"] == d and s["policy"] == p) for d in datasets]
            x = [i + (n - (len(policies) - 1) / 2) * width for i in range(len(datasets))]
            y = [s[key] for s in rows]
            err = [[max(0.0, v - s[lo]) for v, s in zip(y, rows)], [max(0.0, s[hi] - v) for v, s in zip(y, rows)]]
            ax.bar(x, y, width, yerr=err, capsize=2, label=p[:40])
        ax.axhline(1.5 if key == "ttft_vs_draft" else 1.0, color="k", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("batch 1, same run (mean ratio, 95 % paired bootstrap); dashed: the goal's bound")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="humaneval,gsm8k,math500", help="datasets, comma-separated (default: all three)")
    ap.add_argument("--per-dataset", type=int, default=10, help="first N test problems of each (default: 10)")
    ap.add_argument("--policies", default="draft-only,target-only,default",
                    help="policies, comma-separated at the top level; 'default' is the shipped default "
                         "(default: draft-only,target-only,default; draft-only and target-only are needed for the ratios)")
    ap.add_argument("--max-len", type=int, default=1920, help="cache positions per row (default: 1920)")
    ap.add_argument("--draft", default=None, help="draft model (default: the default pair)")
    ap.add_argument("--target", default=None, help="target model (default: the default pair)")
    ap.add_argument("--dtype", default="float32", help="dtype (default: float32, the bench's)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 HumanEval problem, 8 tokens")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    ap.add_argument("--tag", default="default_latency", help="file name stem of the outputs (default: default_latency)")
    args = ap.parse_args(argv)
    if args.per_dataset < 1:
        raise SystemExit("--per-dataset must be >= 1")
    from cascade.bench.datasets import load_dataset, select, split
    from cascade.bench.runs import PolicyRunner, RunCache
    from cascade.library import Cascade
    from cascade.policies import parse_policy, split_policy_specs

    pair = Cascade.from_pretrained(args.draft, args.target, max_rows=1, max_len=args.max_len, dtype=args.dtype)
    shipped = pair.default_policy()
    policies = [shipped if p == "default" else parse_policy(p).describe() for p in split_policy_specs(args.policies)]
    labels = {pol: parse_policy(pol).name if parse_policy(pol).name in ("draft-only", "target-only")
              else "default: " + pol if pol == shipped else pol for pol in policies}
    names = ["humaneval"] if args.quick else [d.strip() for d in args.datasets.split(",") if d.strip()]
    per = 1 if args.quick else args.per_dataset
    problems = []
    for name in names:
        _, test = split(select(load_dataset(name), DATASET_LIMITS.get(name), 0), 0.5, 0)
        for p in test[:per]:
            problems.append(dataclasses.replace(p, max_tokens=8) if args.quick else p)
    from tqdm import tqdm

    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runner = PolicyRunner(pair, RunCache(tmp), "default-latency")
        runner.run("draft-only", problems[:1], progress=False, fresh=True)  # warm-up, not counted
        bar = tqdm(total=len(problems) * len(policies), desc="requests")
        for i, problem in enumerate(problems):
            host = memory_bandwidth_gb_s(0.5)
            for pol in rotated(policies, i):
                rec = runner.run(pol, [problem], progress=False, fresh=True)[0][0]
                rows.append({"dataset": rec.dataset, "problem_id": rec.problem_id, "policy": labels[pol],
                             "correct": rec.correct, "ttft_s": rec.ttft_s, "latency_s": rec.latency_s,
                             "emitted_tokens": rec.emitted_tokens, "target_positions": rec.target_tokens + rec.target_prefill_tokens,
                             "target_passes": rec.passes, "escalations": rec.escalations, "finish_reason": rec.finish_reason,
                             "host_gb_s": round(host, 2)})
                write_rows(out / f"{args.tag}_requests.csv", rows)  # every request as it ends: an interrupted run keeps them
                bar.update()
        bar.close()
    summary = summarise(rows, [labels[p] for p in policies])
    write_rows(out / f"{args.tag}.csv", summary)
    plot(summary, out / f"{args.tag}.png")
    info = machine_info()
    info.update({"batch": 1, "per_dataset": per, "datasets": names, "policies": policies, "shipped_default": shipped,
                 "dtype": args.dtype, "max_tokens": {p.dataset: p.max_tokens for p in problems}})
    (out / f"{args.tag}_machine.json").write_text(json.dumps(info, indent=1))
    print("\n| dataset | policy | n | quality | TTFT s | x draft-only [95 %] | latency s | x target-only [95 %] | target FLOPs x target-only |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['dataset']} | {s['policy']} | {s['n']} | {s['quality']:.1%} | {s['ttft_s']:.2f} | {s['ttft_vs_draft']:.2f}x "
              f"[{s['ttft_lo95']:.2f}, {s['ttft_hi95']:.2f}] | {s['latency_s']:.1f} | {s['latency_vs_target']:.2f}x "
              f"[{s['latency_lo95']:.2f}, {s['latency_hi95']:.2f}] | {s['target_fraction']:.3f} |")
    print(f"\nwrote {out / (args.tag + '.csv')}, _requests.csv, .png and _machine.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
