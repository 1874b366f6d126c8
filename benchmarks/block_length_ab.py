"""Dynamic speculation against every fixed block length, per batch size, in one engine, alternating.

Question: does the block-length controller (``cascade.speculation``) reach the speed of the best fixed k at
each load, down to k = 0 where speculation does not pay? For each batch size, one cycle runs a full batch
(the built-in chat prompts, greedy, ``--max-tokens`` each, all admitted at once) under each configuration
back to back: ``target-only``, ``speculative`` at each fixed k of ``--ks`` (the controller off for that
block) and ``speculative`` with the controller on; the order rotates by one per cycle. Blocks are short
(seconds) and alternate, because the host's memory bandwidth drifts by +-15 % over minutes on a shared VM
(see ``benchmarks/machine.py``): each configuration's ratio to target-only is paired within a cycle and
reported as the mean over cycles with its 95 % t-interval. A fixed k pays the draft's prompt prefill like
the controller does when it speculates; ``speculative`` at k = 0 is not listed, since it runs the very
rounds of target-only (the engine moves such requests to the target-only path).

One process loads the pair once (default pair, the runner's default dtype) and the controller keeps its
measurements across blocks, as a long-lived server's does. Writes ``<tag>.csv`` (per configuration and
batch: mean tok/s, ratio to target-only with interval and range), ``<tag>_blocks.csv`` (every block),
``<tag>.png`` and ``<tag>_machine.json`` to benchmarks/results/.

    .venv/bin/python benchmarks/block_length_ab.py                  # batch 1 / 4 / 16, 4 cycles, about 10 minutes
    .venv/bin/python benchmarks/block_length_ab.py --quick          # tiny: batch 1 and 2, 4 tokens, 1 cycle
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

from machine import machine_info, memory_bandwidth_gb_s
from prompts import PROMPTS
from serve_load import mean_interval, rotated, write_rows


@contextlib.contextmanager
def controller_off(engine):
    """Run the block under the policy's own k: the engine's controller is set aside and restored after."""
    saved, engine.block_controller = engine.block_controller, None
    try:
        yield
    finally:
        engine.block_controller = saved


def configurations(ks: list[int]) -> list[tuple[str, str, bool]]:
    """(label, policy, controller on) in the order of the first cycle."""
    return ([("target-only", "target-only", False)] + [(f"k={k}", f"speculative(k={k})", False) for k in ks]
            + [("dynamic", f"speculative(k={max(ks)})", True)])


def summarise(blocks: list[dict]) -> list[dict]:
    """Per (batch, configuration): mean tok/s, and its ratio to target-only paired within each cycle."""
    out = []
    for batch in dict.fromkeys(b["batch"] for b in blocks):
        base = {b["cycle"]: b["tokens_per_s"] for b in blocks if b["batch"] == batch and b["config"] == "target-only"}
        for config in dict.fromkeys(b["config"] for b in blocks if b["batch"] == batch):
            rows = [b for b in blocks if b["batch"] == batch and b["config"] == config]
            ratios = [b["tokens_per_s"] / base[b["cycle"]] for b in rows if base.get(b["cycle"])]
            lo, hi = mean_interval(ratios)
            out.append({"batch": batch, "config": config, "cycles": len(rows),
                        "tokens_per_s": round(statistics.fmean(b["tokens_per_s"] for b in rows), 3),
                        "ratio_vs_target_only": round(statistics.fmean(ratios), 4) if ratios else float("nan"),
                        "ratio_lo95": round(lo, 4), "ratio_hi95": round(hi, 4),
                        "ratio_min": round(min(ratios), 4) if ratios else float("nan"),
                        "ratio_max": round(max(ratios), 4) if ratios else float("nan"),
                        "mean_k_dynamic": round(statistics.fmean(b["mean_k"] for b in rows), 3)
                        if config == "dynamic" else float("nan")})
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(dict.fromkeys(s["batch"] for s in summary))
    configs = list(dict.fromkeys(s["config"] for s in summary))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(configs)
    for n, config in enumerate(configs):
        rows = [next(s for s in summary if s["batch"] == b and s["config"] == config) for b in batches]
        x = [i + (n - (len(configs) - 1) / 2) * width for i in range(len(batches))]
        y = [s["ratio_vs_target_only"] for s in rows]
        err = [[v - s["ratio_lo95"] if s["ratio_lo95"] == s["ratio_lo95"] else 0 for v, s in zip(y, rows)],
               [s["ratio_hi95"] - v if s["ratio_hi95"] == s["ratio_hi95"] else 0 for v, s in zip(y, rows)]]
        ax.bar(x, y, width, yerr=err, capsize=2, label=config)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("tok/s / target-only (same cycle)")
    ax.set_title("fixed block lengths and dynamic speculation (mean, 95 % t-interval over cycles)")
    ax.legend(fontsize=7, ncol=len(configs))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4,16", help="full batches to compare at (default: 1,4,16)")
    ap.add_argument("--ks", default="1,2,3,5", help="fixed block lengths to run (default: 1,2,3,5); the "
                    "controller's range is 0 .. the largest")
    ap.add_argument("--cycles", type=int, default=4, help="alternating cycles per batch size (default: 4)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per request (default: 48)")
    ap.add_argument("--max-len", type=int, default=1024, help="cache positions per row (default: 1024)")
    ap.add_argument("--draft", default=None, help="draft model (default: the default pair)")
    ap.add_argument("--target", default=None, help="target model (default: the default pair)")
    ap.add_argument("--device", default="auto", help="device (default: auto)")
    ap.add_argument("--dtype", default="auto", help="dtype (default: the runner's default on the device)")
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 1 and 2, k 1 and 2, 4 tokens, 1 cycle")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    ap.add_argument("--tag", default="block_length_ab", help="file name stem of the outputs (default: block_length_ab)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.ks, args.max_tokens, args.cycles = "1,2", "1,2", 4, 1
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ks = sorted({int(k) for k in args.ks.split(",")})
    if args.cycles < 1 or not ks or ks[0] < 1 or min(batches) < 1:
        raise SystemExit("--cycles, --ks and --batch-sizes must be positive")

    from tqdm import tqdm

    from cascade.config import SamplingParams
    from cascade.library import Cascade

    pair = Cascade.from_pretrained(args.draft, args.target, max_rows=max(batches), max_len=args.max_len,
                                   device=args.device, dtype=args.dtype, adaptive_k=True,
                                   backend="torch")  # its figures are the torch runner's
    engine = pair.engine
    params = SamplingParams(max_tokens=args.max_tokens)
    pair.chat([[{"role": "user", "content": PROMPTS[0]}]], SamplingParams(max_tokens=4), policy="speculative")
    blocks = []
    configs = configurations(ks)
    bar = tqdm(total=len(batches) * args.cycles * len(configs), desc="blocks")
    for batch in batches:
        prompts = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch)]
        for cycle in range(args.cycles):
            for label, policy, dynamic in rotated(configs, cycle):
                host = memory_bandwidth_gb_s(1.0)
                chosen = dict(engine.stats.block_length_rounds)
                with contextlib.nullcontext() if dynamic else controller_off(engine):
                    t0 = time.perf_counter()
                    results = pair.chat(prompts, params, policy=policy)
                    wall = time.perf_counter() - t0
                tokens = sum(len(r.token_ids) for r in results)
                ran = {k: n - chosen.get(k, 0) for k, n in engine.stats.block_length_rounds.items()}  # this block's choices
                rounds = sum(ran.values())
                blocks.append({"batch": batch, "cycle": cycle, "config": label, "tokens": tokens, "wall_s": round(wall, 4),
                               "tokens_per_s": round(tokens / wall, 4), "host_gb_s": round(host, 2),
                               "mean_k": round(sum(k * n for k, n in ran.items()) / rounds, 3) if rounds else float("nan")})
                bar.update()
    bar.close()
    summary = summarise(blocks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / f"{args.tag}_blocks.csv", blocks)
    write_rows(out / f"{args.tag}.csv", summary)
    plot(summary, out / f"{args.tag}.png")
    info = machine_info()
    info.update({"max_tokens": args.max_tokens, "batch_sizes": batches, "ks": ks, "cycles": args.cycles,
                 "dtype": str(engine.target.dtype) if hasattr(engine.target, "dtype") else args.dtype})
    (out / f"{args.tag}_machine.json").write_text(json.dumps(info, indent=1))
    print("\n| batch | configuration | tok/s | x target-only (95 % t-interval) [min, max] |")
    print("|---|---|---|---|")
    for s in summary:
        extra = f", mean k {s['mean_k_dynamic']:.2f}" if s["config"] == "dynamic" else ""
        print(f"| {s['batch']} | {s['config']}{extra} | {s['tokens_per_s']:.2f} | {s['ratio_vs_target_only']:.3f} "
              f"({s['ratio_lo95']:.3f}-{s['ratio_hi95']:.3f}) [{s['ratio_min']:.3f}, {s['ratio_max']:.3f}] |")
    print(f"\nwrote {out / (args.tag + '.csv')}, _blocks.csv, .png and _machine.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
