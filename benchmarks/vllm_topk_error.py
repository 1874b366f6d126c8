"""How far the vLLM target's top-k view of ``p`` is from the full ``p``, on the real pair.

A vLLM target returns only the top-k log-probs per position (plus the draft token's), so the runner hands
the engine ``p_k`` = p truncated to those ids and renormalised (``cascade.models.vllm``). This script
teacher-forces the draft's greedy answers through both in-process models, computes the full ``p`` and
``p_k`` at every answer position (``truncate_to_topk``, exactly what the vLLM runner builds) and reports:

- the tail mass 1 - M outside the top-k (it equals TV(p, p_k) for a renormalised truncation);
- the error of max p (what diff / opt / token-v* read) and whether argmax p changes (never, by design);
- per policy, how often its decision flips between p and p_k: the deferral of diff / opt / token-v1..3 at
  a few alphas, and BiLD's rollback check on log p(x).

    .venv/bin/python benchmarks/vllm_topk_error.py            # 8 prompts x 64 tokens, k = 5, 20, 100
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from machine import machine_info
from prompts import PROMPTS
from speed import chat_ids


def teacher_forced_logits(runner, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """[len(answer), V] logits predicting each answer token."""
    runner.free([0])
    logits = runner.forward_span([0], [prompt + answer], num_logits=[len(answer) + 1])[:-1]
    runner.free([0])
    return logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="number of built-in prompts (max %d)" % len(PROMPTS))
    ap.add_argument("--max-tokens", type=int, default=64, help="draft answer tokens per prompt")
    ap.add_argument("--ks", default="5,20,100", help="comma-separated top-k sizes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    ap.add_argument("--tag", default="vllm_topk_error", help="file name stem for the outputs")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from cascade import SamplingParams
    from cascade.library import Cascade
    from cascade.models.vllm import truncate_to_topk
    from cascade.policies import make_policy
    from cascade.verification import verify_stats

    console = Console()
    cascade = Cascade.from_pretrained(max_rows=1, max_len=1024, dtype="float32")
    prompts = [chat_ids(cascade.tokenizer, p) for p in PROMPTS[: args.prompts]]
    answers = [r.token_ids for r in cascade.generate(prompts, SamplingParams(max_tokens=args.max_tokens), policy="draft-only")]
    q = torch.cat([teacher_forced_logits(cascade.draft, p, a) for p, a in zip(prompts, answers)])
    p = torch.cat([teacher_forced_logits(cascade.target, pr, a) for pr, a in zip(prompts, answers)])
    tokens = torch.tensor([t for a in answers for t in a])
    R = len(tokens)
    seed = torch.arange(R)
    full = verify_stats(q, p, tokens, 0.0, seed)
    policies = [make_policy(n, alpha=a) for n in ("diff", "opt", "token-v1", "token-v2", "token-v3") for a in (0.1, 0.3, 0.5)]
    bild = make_policy("bild")
    rows = []
    logp = torch.log_softmax(p.float(), -1)
    for k in [int(x) for x in args.ks.split(",")]:
        pk = truncate_to_topk(p, k, tokens)
        approx = verify_stats(q, pk, tokens, 0.0, seed)
        tail = 1.0 - torch.exp(torch.where(torch.isfinite(pk), logp, torch.full_like(logp, float("-inf")))).sum(-1)
        row = {"k": k, "positions": R, "tail_mass_mean": tail.mean().item(), "tail_mass_p95": tail.quantile(0.95).item(),
               "max_p_abs_err_mean": (approx.max_p - full.max_p).abs().mean().item(),
               "argmax_changed": (pk.argmax(-1) != p.argmax(-1)).float().mean().item()}
        for pol in policies:
            row[f"flip {pol.name}(alpha={pol.alpha})"] = (pol.deferral(approx) != pol.deferral(full)).float().mean().item()
        row["flip bild rollback"] = (bild.check_pending(approx.logp_token) != bild.check_pending(full.logp_token)).float().mean().item()
        rows.append(row)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.tag}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / f"{args.tag}_machine.json").write_text(json.dumps(
        {**machine_info(), "prompts": args.prompts, "max_tokens": args.max_tokens, "positions": R,
         "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    table = Table(title=f"top-k view of p vs full p: {R} answer positions of the real pair")
    table.add_column("quantity")
    for r in rows:
        table.add_column(f"k = {r['k']}")
    for key in rows[0]:
        if key in ("k", "positions"):
            continue
        table.add_row(key, *[f"{r[key]:.4f}" for r in rows])
    console.print(table)
    console.print(f"wrote {out / (args.tag + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
