"""What the learned deferral router costs per drafted token, next to what drafting that token costs.

Issue 13 asks that the router cost "one small matmul per drafted token" and that this be measured. Per
round of B rows at block length k the engine scores B x k drafted positions in one call
(``DeferralRouter.score`` on the confidence kernel's statistics). This script times, on one device and in
one run, for each batch size:

- ``router_us``: one ``score`` call over B x k positions (the shipped router of the default pair, or
  ``--router``; a random one of the same size with ``--smoke``);
- ``confidence_ms``: the confidence statistics those positions need anyway (``confidence_stats`` over
  [B x k, vocab] logits: the torch reference on CPU, the Triton kernel on CUDA);
- ``draft_step_ms``: one decode step of the draft's shape (random weights of Qwen2.5 0.5B, ``runner_cost``)
  at batch B and a 256-token context; a round drafts k of them.

and reports the router's share of the draft side of a round, ``router / (k * step + confidence)``.

    PYTHONPATH=. python benchmarks/router_cost.py                 # this machine: CSV + JSON in results/
    PYTHONPATH=. python benchmarks/router_cost.py --smoke         # tiny shapes, seconds (tests run this)

Writes ``benchmarks/results/router_cost_<machine>.{csv,json}`` (``--out`` sets the stem).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):  # run from the checkout without installing
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from cascade.confidence import confidence_stats  # noqa: E402
from cascade.router import FEATURES, DeferralRouter  # noqa: E402
from runner_cost import SHAPES, VOCAB, _timed, default_machine_name, runner_ops, shape_config  # noqa: E402
from machine import machine_info  # noqa: E402

SHIPPED_ROUTER = ROOT / "cascade" / "routers" / "qwen2.5-coder-0.5b-instruct.json"
SMOKE_SHAPE = {"0.5b": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_size=96,
                            vocab_size=512)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to time on (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", default=None, help="draft weights and logits dtype (default: bfloat16 on CUDA, "
                    "float32 on CPU)")
    ap.add_argument("--batches", default="1,8,16,64", help="comma-separated batch sizes B (default: 1,8,16,64)")
    ap.add_argument("--k", type=int, default=5, help="block length: positions scored per row and round (default 5)")
    ap.add_argument("--context", type=int, default=256, help="cached positions per row for the draft step (default 256)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per figure (default: 20 CPU, 100 CUDA)")
    ap.add_argument("--router", default=str(SHIPPED_ROUTER), help="router file to score with (default: the shipped one)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and a random router: checks the script in seconds")
    ap.add_argument("--out", default=None, help="output stem (default: benchmarks/results/router_cost_<machine>)")
    return ap.parse_args(argv)


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median synchronised milliseconds of ``fn`` over ``reps`` calls, after one warm-up call."""
    fn()
    return statistics.median(_timed(fn, device) for _ in range(reps))


def random_router(device, hidden: int = 16) -> DeferralRouter:
    """A router of the shipped size with random weights (for --smoke and the GPU suite: nothing to load,
    and no optimizer, whose import pulls in torch._dynamo)."""
    g = torch.Generator().manual_seed(0)
    F = len(FEATURES)
    router = DeferralRouter(mean=torch.zeros(F), std=torch.ones(F), w1=torch.randn(F, hidden, generator=g) / F ** 0.5,
                            b1=torch.zeros(hidden), w2=torch.randn(hidden, generator=g) / hidden ** 0.5,
                            b2=torch.zeros(()), info={"random": True})
    return router.to(device)


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    reps = a.reps or (100 if device.type == "cuda" else 20)
    batches = [int(b) for b in a.batches.split(",")]
    if a.k < 1 or not batches or min(batches) < 1:
        raise SystemExit("--k and every --batches entry must be >= 1")
    shapes = SMOKE_SHAPE if a.smoke else SHAPES
    router = random_router(device) if a.smoke else DeferralRouter.load(a.router, device=device)
    info = machine_info()
    machine = "smoke" if a.smoke else default_machine_name(info, a.device)
    stem = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"router_cost_{machine}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    from cascade.models.factory import RunnerOptions, random_runner

    cfg = shape_config("0.5b", shapes)
    vocab = cfg.vocab_size if a.smoke else VOCAB
    draft = random_runner(cfg, RunnerOptions(max_rows=max(batches), max_len=a.context + 8, device=device, dtype=dtype))
    rows_out = []
    for B in batches:
        n = B * a.k
        g = torch.Generator(device=device).manual_seed(B)
        logits = torch.randn(n, vocab, device=device, dtype=dtype, generator=g) * 3
        tokens = logits.float().argmax(-1)
        st = confidence_stats(logits, 1.0, tokens)
        router_ms = median_ms(lambda: router.score(st.max_prob, st.margin, st.entropy, st.token_logprob), device, reps)
        conf_ms = median_ms(lambda: confidence_stats(logits, 1.0, tokens), device, reps)

        step = runner_ops(draft, B, a.context, ks=[])[("step", 1)]  # one decode step, rolled back after
        step_ms = median_ms(step, device, max(3, reps // 4))
        draft_side_ms = a.k * step_ms + conf_ms
        row = dict(machine=machine, device=str(device), dtype=str(dtype).removeprefix("torch."), batch=B, k=a.k,
                   positions=n, vocab=vocab, router_hidden=int(router.w1.shape[1]),
                   router_us=round(router_ms * 1e3, 2), router_us_per_token=round(router_ms * 1e3 / n, 3),
                   confidence_ms=round(conf_ms, 4), draft_step_ms=round(step_ms, 3),
                   router_share_of_draft_side=round(router_ms / draft_side_ms, 6),
                   router_over_confidence=round(router_ms / conf_ms, 4))
        rows_out.append(row)
        print(f"B={B:3d} positions={n:4d}: router {row['router_us']:8.1f} us ({row['router_us_per_token']:.2f} us/token) · "
              f"confidence {conf_ms:8.3f} ms · draft step {step_ms:8.2f} ms · router = "
              f"{100 * row['router_share_of_draft_side']:.3f} % of the round's draft side", flush=True)
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        w.writeheader()
        w.writerows(rows_out)
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "args": vars(a), "rows": rows_out}, indent=1) + "\n")
    print(f"wrote {stem}.csv and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
