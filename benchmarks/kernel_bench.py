"""Kernel microbenchmark: the confidence and verify kernels against torch, at the real vocabulary.

Providers (``--provider``):

- ``torch-eager``: plain unfused torch ops (softmax, topk, log_softmax, logsumexp, multinomial, ...);
- ``torch-reference``: our torch reference (``cascade.kernels.*.{confidence,verify}_reference``);
- ``triton``: our Triton kernel, split over the vocabulary as ``choose_num_splits`` decides;
- ``triton-row``: the same kernel forced to one program per row (the branch used at large batch);
- ``all``: every provider above that can run here.

Shapes: ``--rows`` (default 8 64 256) x ``--vocab`` (default 151,936), ``--dtypes`` (default bf16 fp32),
both kernels. Time is ``triton.testing.do_bench`` (median, L2 flushed) on CUDA, or the median wall clock
of ``--repeats`` calls elsewhere. Bytes read = the logits each kernel must read once (confidence: R x V;
verify: 2 x R x V, draft + target); achieved bandwidth = bytes / time; the bound = bytes / peak HBM
bandwidth (detected from the device name, ``--peak-gbps`` overrides) and ``pct_of_bound`` = bound / time.
The Triton providers are also checked against the reference (argmax / tokens equal) in the same run.

Everything one run measures goes to one CSV, ``benchmarks/results/kernel_bench_<device>.csv``, with the
machine (device, torch / triton / CUDA versions, CPU), plus a PNG bar chart when matplotlib is importable.
GPU machines run it from the checkout with their own torch / triton::

    PYTHONPATH=. python benchmarks/kernel_bench.py --provider all
    PYTHONPATH=. python benchmarks/kernel_bench.py --provider torch-eager --rows 8 --repeats 3   # CPU smoke
    PYTHONPATH=. python benchmarks/kernel_bench.py --interpret --provider triton --rows 2 --vocab 4096  # CPU
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from the checkout without installing
    sys.path.insert(0, str(ROOT))

from cascade.machine import cpu_model  # noqa: E402

PROVIDERS = ("torch-eager", "torch-reference", "triton", "triton-row")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# peak HBM bandwidth, GB/s (vendor figures); first match on the lower-cased device name wins, so a name
# that contains another comes before it ("gh200" before "h200", "l40s" before "l40" before "l4")
PEAK_GBPS = [
    ("gh200", 4000.0), ("h200", 4800.0), ("h100 nvl", 3900.0), ("h100 pcie", 2000.0), ("h100", 3350.0),
    ("h800", 3350.0), ("b200", 8000.0), ("a100-sxm4-80gb", 2039.0), ("a100 80gb pcie", 1935.0),
    ("a100", 1555.0), ("l40s", 864.0), ("l40", 864.0), ("l4", 300.0), ("a10g", 600.0), ("a10", 600.0),
    ("v100", 900.0), ("t4", 320.0), ("rtx 4090", 1008.0), ("rtx 3090", 936.0),
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", default="all", choices=PROVIDERS + ("all",))
    ap.add_argument("--kernels", nargs="+", default=["confidence", "verify"], choices=["confidence", "verify"])
    ap.add_argument("--rows", nargs="+", type=int, default=[8, 64, 256])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per point off CUDA (median)")
    ap.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup on CUDA")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time on CUDA")
    ap.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth, GB/s")
    ap.add_argument("--interpret", action="store_true",
                    help="run the Triton providers on CPU through TRITON_INTERPRET=1 (slow; use small shapes)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------- machine
def machine_info(torch, device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = ""
    return info


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    low = name.lower()
    for key, gbps in PEAK_GBPS:
        if key in low:
            return gbps
    return None


def slug(name: str) -> str:
    if name.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------------------- providers
def eager_confidence(torch, logits, temp, tokens):
    """Unfused torch ops, one per statistic."""
    t = torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    z = logits.float() / t
    p = torch.softmax(z, dim=-1)
    top = p.topk(2, dim=-1)
    logp = torch.log_softmax(z, dim=-1)
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return {
        "argmax": top.indices[:, 0], "max_prob": top.values[:, 0], "margin": top.values[:, 0] - top.values[:, 1],
        "entropy": entropy, "logsumexp": torch.logsumexp(z, dim=-1), "token_logprob": logp.gather(1, tokens[:, None])[:, 0],
    }


def eager_verify(torch, q_logits, p_logits, x, temp, gen):
    """Unfused torch ops: two softmaxes, TV, gathers, two multinomial draws (a cost baseline: greedy
    rows are not special-cased)."""
    greedy = temp <= 0
    t = torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    q = torch.softmax(q_logits.float() / t, dim=-1)
    p = torch.softmax(p_logits.float() / t, dim=-1)
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
    return {
        "q_token": q.gather(1, x[:, None])[:, 0], "p_token": p.gather(1, x[:, None])[:, 0],
        "max_q": q.amax(-1), "max_p": p.amax(-1), "tv": (p - q).clamp_min(0).sum(-1),
        "residual_token": torch.multinomial(residual, 1, generator=gen)[:, 0],
        "target_token": torch.multinomial(p, 1, generator=gen)[:, 0],
    }


def make_inputs(torch, kernel, rows, vocab, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    temp = torch.tensor([[0.0, 0.7, 1.0, 1.3][r % 4] for r in range(rows)], dtype=torch.float32)
    x = q.float().argmax(-1)
    if kernel == "confidence":
        return [t.to(device) for t in (q, temp, x)]
    p = (q.float() + torch.randn(rows, vocab, generator=g)).to(dtype)
    seeds = torch.randint(0, 2**62, (rows,), generator=g)
    return [t.to(device) for t in (q, p, x, temp, seeds)]


def build_fn(torch, kernel, provider, inputs, device):
    """A zero-argument callable running one provider on prepared inputs, or None if it cannot run."""
    from cascade.confidence import inverse_temperature

    if kernel == "confidence":
        logits, temp, x = inputs
        inv_t = inverse_temperature(temp, len(temp), device)
        if provider == "torch-eager":
            return lambda: eager_confidence(torch, logits, temp, x)
        from cascade.kernels import confidence as K

        if provider == "torch-reference":
            return lambda: K.confidence_reference(logits, inv_t, x)
        splits = 1 if provider == "triton-row" else None
        return lambda: K.confidence_triton(logits, inv_t, x, num_splits=splits)
    q, p, x, temp, seeds = inputs
    inv_t = inverse_temperature(temp, len(temp), device)
    if provider == "torch-eager":
        gen = torch.Generator(device=device).manual_seed(0)
        return lambda: eager_verify(torch, q, p, x, temp, gen)
    from cascade.kernels import verify as K

    if provider == "torch-reference":
        return lambda: K.verify_reference(q, p, x, temp, inv_t, seeds)
    splits = 1 if provider == "triton-row" else None
    return lambda: K.verify_triton(q, p, x, temp, inv_t, seeds, num_splits=splits)


def num_splits_used(kernel, provider, rows, vocab, dtype, device):
    if not provider.startswith("triton"):
        return ""
    if provider == "triton-row":
        return 1
    if kernel == "confidence":
        from cascade.kernels import confidence as K
    else:
        from cascade.kernels import verify as K
    import triton

    block = triton.next_power_of_2(K.default_block_v(dtype))
    return K.split_layout(vocab, block, K.choose_num_splits(rows, vocab, block, K.num_sms(device)))[1]


def check(torch, kernel, got, inputs, device) -> bool:
    """Triton output vs the reference on the same inputs: integer outputs equal, floats close."""
    from cascade.confidence import inverse_temperature

    if kernel == "confidence":
        from cascade.kernels import confidence as K

        logits, temp, x = inputs
        want = K.confidence_reference(logits, inverse_temperature(temp, len(temp), device), x)
        ints = ("argmax",)
    else:
        from cascade.kernels import verify as K

        q, p, x, temp, seeds = inputs
        want = K.verify_reference(q, p, x, temp, inverse_temperature(temp, len(temp), device), seeds)
        ints = ("residual_token", "target_token")
    for name, value in want.items():
        if name in ints:
            if not torch.equal(got[name], value):
                return False
        elif not torch.allclose(got[name], value, rtol=1e-4, atol=1e-5, equal_nan=True):
            return False
    return True


def time_ms(torch, fn, device, args) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds per call."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            med, lo, hi = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8])
            return float(med), float(lo), float(hi)
        except ImportError:  # CUDA events by hand
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(max(args.repeats, 10)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return _quantiles(times)
    fn()  # warmup (and the interpreter's first-call setup)
    times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    s = sorted(times)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return statistics.median(s), pick(0.2), pick(0.8)


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info(torch, device)
    peak = peak_gbps(info["device"], args.peak_gbps)
    try:
        import triton  # noqa: F401

        have_triton = True
    except ImportError:
        have_triton = False
    triton_ok = have_triton and (device.type == "cuda" or args.interpret)
    providers = PROVIDERS if args.provider == "all" else (args.provider,)
    skipped = [p for p in providers if p.startswith("triton") and not triton_ok]
    if skipped:
        print(f"skipping {skipped}: needs CUDA (or --interpret) and triton", file=sys.stderr)
    providers = [p for p in providers if p not in skipped]

    print(f"device: {info['device']} | torch {info['torch']} | triton {info['triton'] or '-'} | "
          f"peak {peak or '?'} GB/s")
    header = f"{'kernel':<11}{'provider':<16}{'dtype':<6}{'rows':>6}{'time ms':>11}{'GB/s':>9}{'bound ms':>10}{'% bound':>9}  ok"
    print(header)
    rows_out = []
    for kernel in args.kernels:
        for dname in args.dtypes:
            dtype = getattr(torch, DTYPES[dname])
            for rows in args.rows:
                inputs = make_inputs(torch, kernel, rows, args.vocab, dtype, device, args.seed)
                n_bytes = (1 if kernel == "confidence" else 2) * rows * args.vocab * inputs[0].element_size()
                bound_ms = n_bytes / (peak * 1e9) * 1e3 if peak else None
                for provider in providers:
                    fn = build_fn(torch, kernel, provider, inputs, device)
                    ok = check(torch, kernel, fn(), inputs, device) if provider.startswith("triton") else ""
                    med, lo, hi = time_ms(torch, fn, device, args)
                    gbps = n_bytes / (med * 1e-3) / 1e9
                    row = {
                        "kernel": kernel, "provider": provider, "dtype": dname, "rows": rows, "vocab": args.vocab,
                        "num_splits": num_splits_used(kernel, provider, rows, args.vocab, dtype, device),
                        "time_ms": round(med, 5), "time_ms_p20": round(lo, 5), "time_ms_p80": round(hi, 5),
                        "bytes_read": n_bytes, "achieved_gbps": round(gbps, 2),
                        "peak_gbps": peak or "", "bound_ms": round(bound_ms, 5) if bound_ms else "",
                        "pct_of_bound": round(100 * bound_ms / med, 2) if bound_ms else "",
                        "matches_reference": ok, "timing": "do_bench" if device.type == "cuda" else "wall",
                        "repeats": args.repeats if device.type != "cuda" else "",
                        "interpret": bool(args.interpret and device.type != "cuda"),
                        **info,
                    }
                    rows_out.append(row)
                    print(f"{kernel:<11}{provider:<16}{dname:<6}{rows:>6}{med:>11.4f}{gbps:>9.2f}"
                          f"{(f'{bound_ms:.4f}' if bound_ms else '-'):>10}"
                          f"{(f'{100 * bound_ms / med:.1f}' if bound_ms else '-'):>9}  {ok}", flush=True)
                del inputs
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernel_bench_{slug(info['device'])}"
    csv_path = args.out / f"{stem}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_out[0].keys()) if rows_out else ["kernel"])
        writer.writeheader()
        writer.writerows(rows_out)
    print(f"wrote {csv_path}")
    png = plot(rows_out, args.out / f"{stem}.png", info["device"])
    if png:
        print(f"wrote {png}")
    failed = [r for r in rows_out if r["matches_reference"] is False]
    if failed:
        print(f"{len(failed)} Triton point(s) did not match the reference", file=sys.stderr)
        return 1
    return 0


def plot(rows: list[dict], path: Path, device: str) -> Path | None:
    """Bar chart: one panel per kernel, groups = (dtype, rows), bars = providers, log time axis, the
    bandwidth bound as a black tick over each group."""
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(kernels), figsize=(7 * len(kernels), 4.5), squeeze=False)
    for ax, kernel in zip(axes[0], kernels):
        sub = [r for r in rows if r["kernel"] == kernel]
        groups = list(dict.fromkeys((r["dtype"], r["rows"]) for r in sub))
        width = 0.8 / max(1, len(providers))
        for i, prov in enumerate(providers):
            xs, ys = [], []
            for g, (dname, nrows) in enumerate(groups):
                hit = [r for r in sub if r["provider"] == prov and r["dtype"] == dname and r["rows"] == nrows]
                if hit:
                    xs.append(g + (i - (len(providers) - 1) / 2) * width)
                    ys.append(hit[0]["time_ms"])
            ax.bar(xs, ys, width=width, label=prov)
        for g, (dname, nrows) in enumerate(groups):
            bound = next((r["bound_ms"] for r in sub if r["dtype"] == dname and r["rows"] == nrows and r["bound_ms"]), None)
            if bound:
                ax.hlines(bound, g - 0.45, g + 0.45, colors="black", linewidth=2,
                          label="bandwidth bound" if g == 0 else None)
        ax.set_xticks(range(len(groups)), [f"{d}\n{n} rows" for d, n in groups])
        ax.set_yscale("log")
        ax.set_ylabel("time per call (ms, log)")
        ax.set_title(f"{kernel} kernel, V = {sub[0]['vocab']:,}")
        ax.legend(fontsize=8)
    fig.suptitle(device, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
