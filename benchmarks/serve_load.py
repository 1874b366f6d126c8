"""Serving load benchmark: the real `cascade serve` driven by the real `openai` client on 127.0.0.1.

For each policy (target-only, speculative, chow by default) and each concurrency (1, 4, 16), a fixed set
of chat requests (greedy, streamed, bounded in count and time) is sent by that many concurrent clients.
Per level: throughput (completion tokens / wall time of the level), latency p50 / p95, time to first token
p50 / p95, target_token_fraction and failed requests.

Order and noise: throughput measured minutes apart differs for reasons outside the server. On a shared
2-core cloud VM the memory bandwidth the host gives this machine moves with its other tenants (a fixed
bf16 matrix product: 18.6 to 24.5 GB/s in consecutive 5-second windows; six identical target-only runs of
one engine back to back: 56 to 72.5 tok/s, with no CPU steal and constant memory), and decoding is
bandwidth-bound. A fixed order (target-only always first) therefore biases every "x target-only" ratio, and
one run of each level cannot tell a 5 % difference from the host. The levels are run in rounds: each repeat
visits every concurrency, and at each concurrency runs all policies back to back in an order rotated by one
per repeat (by default twice round the rotation, so every policy runs first, middle and last twice); levels
are short (at most one wave of 16 requests) so that the levels compared are close in time. A policy's ratio
to target-only is paired (its level / target-only's level of the same repeat and concurrency) and reported
as the mean over repeats with its 95 % t-interval and the lowest and highest repeat; ratios across
concurrency likewise. Before each level the script probes the host's memory bandwidth for ``--host-probe``
seconds while the server idles (``benchmarks/machine.py``), saves it with the level, and prints its
correlation with the levels' spread, so the host's state behind each figure is on record.
Every level's own figures go to ``<tag>_levels.csv``; the summary (means, intervals, ranges) to ``<tag>.csv``.

By default the script starts `cascade serve` itself (default pair, --max-rows = the highest concurrency, so
every client holds a row) on a free port of 127.0.0.1, and stops it at the end; `--url` drives a server
that is already running instead. Writes CSV, a PNG (throughput and latency vs concurrency) and machine info
to benchmarks/results/.

    .venv/bin/python benchmarks/serve_load.py                      # default pair, CPU: 6 interleaved repeats, about 22 minutes
    .venv/bin/python benchmarks/serve_load.py --quick              # 2 levels, few tokens: a smoke test
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --policies chow:0.3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import math
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from machine import machine_info, memory_bandwidth_gb_s
from prompts import PROMPTS


@dataclass
class Level:
    """The figures of one (policy, concurrency) level of one repeat."""

    policy: str
    concurrency: int
    repeat: int
    position: int  # its place among the policies run back to back at this concurrency in this repeat
    requests: int
    failed: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    target_token_fraction: float
    host_gb_s: float = float("nan")  # the host's memory bandwidth just before the level (``--host-probe``)


@dataclass
class Summary:
    """One (policy, concurrency) over all repeats: means, and the paired ratios' mean and range."""

    policy: str
    concurrency: int
    repeats: int
    failed: int
    tokens_per_s: float  # mean over repeats
    tokens_per_s_min: float
    tokens_per_s_max: float
    latency_p50_s: float  # the means over repeats of each level's percentile
    latency_p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    target_token_fraction: float
    speedup_vs_concurrency_1: float  # mean over repeats of (this level / the policy's lowest concurrency)
    speedup_min: float
    speedup_max: float
    ratio_vs_target_only: float  # mean over repeats of (this level / target-only's, same repeat and concurrency)
    ratio_min: float
    ratio_max: float
    # 95 % t-intervals of the two means over repeats (nan with one repeat; absent from older CSVs)
    speedup_lo95: float = float("nan")
    speedup_hi95: float = float("nan")
    ratio_lo95: float = float("nan")
    ratio_hi95: float = float("nan")


def requests_per_level(concurrency: int) -> int:
    """The default requests of a level: two per client, at least 3, at most 16 (one wave at 16 clients)."""
    return min(16, max(3, 2 * concurrency))


def rotated(items: list, shift: int) -> list:
    """``items`` rotated left by ``shift`` (mod its length): the run order of a repeat."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def schedule(policies: list[str], concurrency: list[int], repeats: int) -> list[tuple[int, int, int, str]]:
    """(repeat, concurrency, position, policy) in run order: every repeat visits every concurrency, and at
    each one runs all policies back to back, rotated by one per repeat, so that over ``len(policies)``
    repeats each policy runs at each position once."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    out = []
    for r in range(repeats):
        for c in concurrency:
            for pos, policy in enumerate(rotated(policies, r)):
                out.append((r, c, pos, policy))
    return out


def summarise(levels: list[Level]) -> list[Summary]:
    """Per (policy, concurrency), in first-seen order: means over repeats and paired ratios (each repeat's
    level against target-only's level of the same repeat and concurrency, and against the same policy's
    level at the lowest concurrency of the same repeat). A ratio with no partner is 0."""
    by = {(lv.policy, lv.concurrency, lv.repeat): lv for lv in levels}
    lowest = min(lv.concurrency for lv in levels)
    keys = list(dict.fromkeys((lv.policy, lv.concurrency) for lv in levels))

    def ratios(rows: list[Level], partner) -> list[float]:
        out = []
        for lv in rows:
            p = partner(lv)
            if p is not None and p.tokens_per_s > 0:
                out.append(lv.tokens_per_s / p.tokens_per_s)
        return out

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    def interval(xs: list[float]) -> tuple[float, float]:
        lo, hi = mean_interval(xs)
        return round(lo, 6), round(hi, 6)

    summaries = []
    for policy, c in keys:
        rows = sorted((lv for lv in levels if lv.policy == policy and lv.concurrency == c), key=lambda lv: lv.repeat)
        vs_target = ratios(rows, lambda lv: by.get(("target-only", lv.concurrency, lv.repeat)))
        vs_low = ratios(rows, lambda lv: by.get((lv.policy, lowest, lv.repeat)))
        tps = [lv.tokens_per_s for lv in rows]
        (s_lo, s_hi), (r_lo, r_hi) = interval(vs_low), interval(vs_target)
        summaries.append(Summary(
            policy=policy, concurrency=c, repeats=len(rows), failed=sum(lv.failed for lv in rows),
            tokens_per_s=mean(tps), tokens_per_s_min=min(tps), tokens_per_s_max=max(tps),
            latency_p50_s=mean([lv.latency_p50_s for lv in rows]), latency_p95_s=mean([lv.latency_p95_s for lv in rows]),
            ttft_p50_s=mean([lv.ttft_p50_s for lv in rows]), ttft_p95_s=mean([lv.ttft_p95_s for lv in rows]),
            target_token_fraction=mean([lv.target_token_fraction for lv in rows]),
            speedup_vs_concurrency_1=mean(vs_low), speedup_min=min(vs_low, default=0.0), speedup_max=max(vs_low, default=0.0),
            ratio_vs_target_only=mean(vs_target), ratio_min=min(vs_target, default=0.0),
            ratio_max=max(vs_target, default=0.0), speedup_lo95=s_lo, speedup_hi95=s_hi, ratio_lo95=r_lo,
            ratio_hi95=r_hi))
    return summaries


def mean_interval(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """The t-interval of the mean of ``xs`` (independent repeats of a paired ratio); (nan, nan) for fewer
    than two values."""
    if len(xs) < 2:
        return float("nan"), float("nan")
    from scipy.stats import t

    m, half = statistics.fmean(xs), t.ppf(0.5 + level / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m - half, m + half


def host_correlation(levels: list[Level]) -> float:
    """Pearson r between each level's host bandwidth probe and its throughput relative to the mean of its
    (policy, concurrency): how much of the spread between repeats the host's state explains (nan when
    the probe was off or nothing varies)."""
    groups: dict[tuple[str, int], list[Level]] = {}
    for lv in levels:
        groups.setdefault((lv.policy, lv.concurrency), []).append(lv)
    xs, ys = [], []
    for group in groups.values():
        base = statistics.fmean(lv.tokens_per_s for lv in group)
        for lv in group:
            if lv.host_gb_s == lv.host_gb_s and base > 0:  # not nan
                xs.append(lv.host_gb_s)
                ys.append(lv.tokens_per_s / base)
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:
        return float("nan")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def one_request(client, model: str, prompt: str, max_tokens: int, policy: str) -> dict:
    """One streamed chat request -> latency, time to first token, completion tokens, cascade usage."""
    t0 = time.perf_counter()
    ttft = None
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"cascade": {"policy": policy}})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage
    latency = time.perf_counter() - t0
    extra = usage.model_extra.get("cascade", {}) if usage is not None else {}
    return {"latency": latency, "ttft": ttft if ttft is not None else latency,
            "tokens": usage.completion_tokens if usage is not None else 0,
            "target_tokens": extra.get("target_tokens", 0)}


def run_level(client, model: str, policy: str, concurrency: int, n_requests: int, max_tokens: int,
              time_limit_s: float, repeat: int = 0, position: int = 0) -> Level:
    """n_requests requests by `concurrency` clients; requests not started within time_limit_s are skipped."""
    results, failed = [], 0
    t0 = time.perf_counter()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]

    def worker(prompt: str):
        if time.perf_counter() - t0 > time_limit_s:
            return None
        return one_request(client, model, prompt, max_tokens, policy)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for fut in concurrent.futures.as_completed([pool.submit(worker, p) for p in prompts]):
            try:
                r = fut.result()
            except Exception as exc:  # noqa: BLE001 -- a failed request is counted, not fatal
                print(f"    request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                failed += 1
                continue
            if r is not None:
                results.append(r)
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return Level(policy=policy, concurrency=concurrency, repeat=repeat, position=position,
                 requests=len(results), failed=failed,
                 completion_tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall if wall else 0.0,
                 latency_p50_s=percentile([r["latency"] for r in results], 0.5),
                 latency_p95_s=percentile([r["latency"] for r in results], 0.95),
                 ttft_p50_s=percentile([r["ttft"] for r in results], 0.5),
                 ttft_p95_s=percentile([r["ttft"] for r in results], 0.95),
                 target_token_fraction=sum(r["target_tokens"] for r in results) / tokens if tokens else 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cascade.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-rows", str(max(args.concurrency)), "--max-len", str(args.max_len), "--log-level", "warning",
           "--device", args.device]
    for flag in ("draft", "target", "dtype"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    if args.fixed_k:
        cmd.append("--fixed-k")
    print("starting:", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float = 900) -> None:
    import httpx2

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx2.get(url + "/health", timeout=2).status_code == 200:
                return
        except Exception:  # noqa: BLE001 -- not up yet
            pass
        time.sleep(1)
    raise SystemExit(f"the server at {url} did not become healthy in {timeout_s:.0f} s")


def plot(summaries: list[Summary], path: Path) -> None:
    """Throughput (mean, bars from the lowest to the highest repeat), latency and TTFT vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    levels_seen = sorted({sm.concurrency for sm in summaries})
    for n, policy in enumerate(dict.fromkeys(sm.policy for sm in summaries)):
        rows = [sm for sm in summaries if sm.policy == policy]
        c, color = [sm.concurrency for sm in rows], f"C{n}"
        tps = [sm.tokens_per_s for sm in rows]
        err = [[t - sm.tokens_per_s_min for t, sm in zip(tps, rows)], [sm.tokens_per_s_max - t for t, sm in zip(tps, rows)]]
        axes[0].errorbar(c, tps, yerr=err, marker="o", color=color, capsize=3, label=policy)
        axes[1].plot(c, [sm.latency_p50_s for sm in rows], marker="o", color=color, label=f"{policy} p50")
        axes[1].plot(c, [sm.latency_p95_s for sm in rows], marker="x", color=color, linestyle="--", label=f"{policy} p95")
        axes[2].plot(c, [sm.ttft_p50_s for sm in rows], marker="o", color=color, label=f"{policy} p50")
        axes[2].plot(c, [sm.ttft_p95_s for sm in rows], marker="x", color=color, linestyle="--", label=f"{policy} p95")
    for ax, title, ylabel in zip(axes, ("throughput (mean, range over repeats)", "request latency", "time to first token"),
                                 ("completion tokens / s", "seconds", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels_seen, [str(c) for c in levels_seen])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    repeats = max(sm.repeats for sm in summaries)
    fig.suptitle(f"cascade serve under load (openai client, 127.0.0.1, greedy, streamed; {repeats} interleaved repeats)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_rows(path: str | Path, cls):
    """Rows of a CSV this script wrote, as ``cls`` (Level or Summary)."""
    types = dict(cls.__annotations__)
    with open(path) as f:
        return [cls(**{k: (int(v) if types[k] == "int" else float(v) if types[k] == "float" else v)
                       for k, v in r.items()}) for r in csv.DictReader(f)]


def write_rows(path: Path, rows) -> None:
    """A CSV of ``rows`` (dataclasses or dicts with the same keys), floats to 4 decimals."""
    dicts = [row if isinstance(row, dict) else asdict(row) for row in rows]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dicts[0]))
        w.writeheader()
        for row in dicts:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="drive this running server instead of starting one (127.0.0.1 only)")
    ap.add_argument("--policies", default="target-only,speculative,chow(alpha=0.3)",
                    help="policies separated by ';' or by commas outside parentheses (default: target-only, "
                         "speculative, chow(alpha=0.3)); target-only is added first if missing, as the ratios' base")
    ap.add_argument("--concurrency", default="1,4,16", help="concurrency levels (default: 1,4,16)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="rounds over all levels, policy order rotated by one per round (default: twice as many "
                         "as policies, so each runs at each place in the order twice)")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level (default: 2 x concurrency, at least 3 and at most 16: one wave at 16, "
                         "so that the levels compared are short and close in time)")
    ap.add_argument("--host-probe", type=float, default=2.0, metavar="SECONDS",
                    help="before each level, measure the host's memory bandwidth for this long in this process "
                         "while the server idles (benchmarks/machine.py; 0: off); saved per level (default: 2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: 64)")
    ap.add_argument("--time-limit", type=float, default=300.0,
                    help="seconds per level after which no new request starts (default: 300)")
    ap.add_argument("--max-len", type=int, default=1024, help="cache positions per row of the started server (default: 1024)")
    ap.add_argument("--draft", default=None, help="draft model of the started server (default: the default pair)")
    ap.add_argument("--target", default=None, help="target model of the started server (default: the default pair)")
    ap.add_argument("--device", default="cpu", help="device of the started server (default: cpu)")
    ap.add_argument("--dtype", default=None, help="dtype of the started server (default: per device)")
    ap.add_argument("--fixed-k", action="store_true",
                    help="start the server with --fixed-k (no dynamic speculation: lossless requests always draft k)")
    ap.add_argument("--quick", action="store_true", help="smoke test: concurrency 1 and 4, 4 requests x 8 tokens, 1 repeat")
    ap.add_argument("--out", default="benchmarks/results", help="output directory (default: benchmarks/results)")
    ap.add_argument("--tag", default="serve_load", help="file name stem of the outputs (default: serve_load)")
    ap.add_argument("--replot", default=None, metavar="CSV", help="only redraw the PNG of an earlier run's summary CSV")
    args = ap.parse_args(argv)
    if args.replot:
        plot(_read_rows(args.replot, Summary), Path(args.replot).with_suffix(".png"))
        print(f"wrote {Path(args.replot).with_suffix('.png')}")
        return 0
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    from cascade.policies import split_policy_specs

    policies = split_policy_specs(args.policies)
    if "target-only" not in policies:
        policies.insert(0, "target-only")
    if args.quick:
        args.concurrency, args.max_tokens, args.requests, args.repeats = [1, 4], 8, 4, args.repeats or 1
    repeats = args.repeats or 2 * len(policies)
    plan = schedule(policies, args.concurrency, repeats)
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("--url: this benchmark drives a server on 127.0.0.1 only")

    import openai

    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args, port)
    levels: list[Level] = []
    try:
        wait_ready(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        for policy in policies:  # warm-up: every policy's first request pays its one-off costs here
            one_request(client, "cascade", PROMPTS[0], 4, policy)
        for i, (r, c, pos, policy) in enumerate(plan):
            n = args.requests or requests_per_level(c)
            print(f"  [{i + 1}/{len(plan)}] repeat {r + 1}/{repeats}, {policy} @ concurrency {c}: {n} requests ...", flush=True)
            host = memory_bandwidth_gb_s(args.host_probe) if args.host_probe > 0 else float("nan")
            lv = run_level(client, "cascade", policy, c, n, args.max_tokens, args.time_limit, repeat=r, position=pos)
            lv.host_gb_s = round(host, 2)
            levels.append(lv)
            print(f"    {lv.tokens_per_s:.2f} tok/s, latency p50 {lv.latency_p50_s:.1f} s, "
                  f"ttft p50 {lv.ttft_p50_s:.2f} s, failed {lv.failed}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)

    summaries = summarise(levels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / f"{args.tag}_levels.csv", levels)
    write_rows(out / f"{args.tag}.csv", summaries)
    plot(summaries, out / f"{args.tag}.png")
    info = machine_info()
    info.update({"max_tokens": args.max_tokens, "concurrency": args.concurrency, "policies": policies,
                 "repeats": repeats, "order": "per repeat and concurrency, policies rotated by one per repeat",
                 "host_probe_s": args.host_probe,
                 "server": url if args.url else "started by the benchmark", "fixed_k": args.fixed_k})
    (out / f"{args.tag}_machine.json").write_text(json.dumps(info, indent=1))

    low = min(args.concurrency)
    print(f"\n{repeats} repeats; ratios are paired within a repeat: mean (95 % t-interval) [lowest, highest repeat]")
    print(f"| policy | concurrency | tok/s mean [min, max] | x concurrency {low} | x target-only | "
          "latency p50 / p95 s | ttft p50 / p95 s | target frac | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sm in summaries:
        print(f"| {sm.policy} | {sm.concurrency} | {sm.tokens_per_s:.2f} [{sm.tokens_per_s_min:.2f}, {sm.tokens_per_s_max:.2f}] | "
              f"{sm.speedup_vs_concurrency_1:.2f} ({sm.speedup_lo95:.2f}-{sm.speedup_hi95:.2f}) "
              f"[{sm.speedup_min:.2f}, {sm.speedup_max:.2f}] | "
              f"{sm.ratio_vs_target_only:.2f} ({sm.ratio_lo95:.2f}-{sm.ratio_hi95:.2f}) "
              f"[{sm.ratio_min:.2f}, {sm.ratio_max:.2f}] | "
              f"{sm.latency_p50_s:.1f} / {sm.latency_p95_s:.1f} | {sm.ttft_p50_s:.2f} / {sm.ttft_p95_s:.2f} | "
              f"{sm.target_token_fraction:.2f} | {sm.failed} |")
    probes = [lv.host_gb_s for lv in levels if lv.host_gb_s == lv.host_gb_s]
    if probes:
        print(f"\nhost memory bandwidth before each level: {min(probes):.1f} to {max(probes):.1f} GB/s; its "
              f"correlation with each level's throughput / its policy-and-concurrency mean: r = {host_correlation(levels):.2f}")
    print(f"\nwrote {out / (args.tag + '.csv')}, _levels.csv, .png and _machine.json")
    return 1 if any(lv.failed for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
