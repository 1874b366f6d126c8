"""Which cascade policy is fastest at a given share of the target's quality: read from a ``cascade bench`` CSV.

Per family, among the configurations whose *dev* quality is at least ``--share`` of target-only's dev quality,
the one with the least dev modelled time is chosen; its *test* quality and modelled time (÷ target-only's,
priced by the bench's ``--cost-file``) are reported, families ordered by dev time. With a llama.cpp cost file
(``benchmarks/runner_cost.py --gguf``) this answers "what is fastest on llama.cpp at 95 % of the target's
quality" from the exact fp32 records of the same weights.

    .venv/bin/cascade bench --dataset humaneval --limit 0 --batch-size 16 --max-len 1024 --real-check none \\
        --cost-file benchmarks/results/runner_cost_llamacpp-cpu-avx2-2c.csv --tag bench_humaneval164_llamacpp_costs
    .venv/bin/python benchmarks/fastest_at_quality.py benchmarks/results/bench_humaneval164_llamacpp_costs.csv

Writes ``<csv stem>_fastest.csv`` beside the input and prints the table.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def fastest(rows: list[dict], share: float) -> tuple[list[dict], dict]:
    """(one row per family: the dev choice and its test figures, sorted by dev time; the baselines' test figures)."""
    dev = {(r["family"], r["config"]): r for r in rows if r["source"].endswith("-dev")}
    test = {(r["family"], r["config"]): r for r in rows if r["source"].endswith("-test")}

    def baseline(split: dict, family: str) -> dict:
        return next(r for (f, _), r in split.items() if f == family)

    target_dev = float(baseline(dev, "target-only")["quality"])
    chosen: dict[str, tuple[float, str]] = {}
    for (family, config), r in dev.items():
        if family == "oracle" or float(r["quality"]) < share * target_dev:
            continue
        t = float(r["modelled_time"])
        if family not in chosen or t < chosen[family][0]:
            chosen[family] = (t, config)
    target_test = float(baseline(test, "target-only")["quality"])
    out = []
    for family, (t, config) in sorted(chosen.items(), key=lambda kv: kv[1][0]):
        r = test[(family, config)]
        out.append({"family": family, "config": config, "dev_modelled_time": round(t, 4),
                    "test_quality": float(r["quality"]), "test_share_of_target": round(float(r["quality"]) / target_test, 4),
                    "test_modelled_time": float(r["modelled_time"]), "test_latency_ms": float(r["latency_ms"]),
                    "test_ttft_ms": float(r["ttft_ms"])})
    base = {f: {"quality": float(baseline(test, f)["quality"]), "modelled_time": float(baseline(test, f)["modelled_time"])}
            for f in ("draft-only", "target-only")}
    return out, base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="a cascade bench CSV (benchmarks/results/bench_*.csv)")
    ap.add_argument("--share", type=float, default=0.95, help="share of target-only's dev quality (default: 0.95)")
    args = ap.parse_args(argv)
    path = Path(args.csv)
    table, base = fastest(list(csv.DictReader(path.open())), args.share)
    print(f"{path.name}: test draft-only {base['draft-only']['quality']:.3f} (time {base['draft-only']['modelled_time']:.3f}), "
          f"target-only {base['target-only']['quality']:.3f}; configurations with dev quality >= {args.share:.0%} of "
          f"target-only's, the fastest on dev per family:")
    for r in table:
        print(f"  {r['family']:14s} dev time {r['dev_modelled_time']:.3f} | test quality {r['test_quality']:.3f} "
              f"({r['test_share_of_target']:.2f} of target), time {r['test_modelled_time']:.3f}, latency "
              f"{r['test_latency_ms']:.0f} ms, TTFT {r['test_ttft_ms']:.0f} ms | {r['config']}")
    out = path.with_name(path.stem + "_fastest.csv")
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
