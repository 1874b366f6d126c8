"""Which draft-side features predict where the target disagrees: the confidence statistics the learned
router reads today, the draft's last hidden state (issue 13 asks for it), or both.

Data: the draft-only answers and teacher-forced statistics ``cascade bench`` cached (HumanEval 164 and
GSM8K 250, seed 0, the bench's dev / test splits). The hidden state is the draft's final-normed state
that feeds its LM head, at every answer position, from one teacher-forced draft pass per answer (the
draft alone is loaded, fp32). Models are fit on dev positions of both datasets and scored on test
positions: AUC for "argmax p != argmax q" against ``1 - max q``. Feature sets: the router's five
statistics (``cascade.router.FEATURES``); the hidden state alone (logistic, and a 16-unit MLP); the
hidden state's top principal components (of the dev positions) next to the statistics.

    .venv/bin/python benchmarks/router_features.py          # needs the bench cache of both datasets

Writes benchmarks/results/router_features.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import machine_info


class _HiddenTap:
    """Stands in for the runner's LM head for one pass and keeps its input (the final-normed hidden
    state of the positions whose logits the pass returns)."""

    def __init__(self, head):
        self.head, self.seen = head, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().float().clone())
        return self.head(x)


def fit_scorer(features: torch.Tensor, labels: torch.Tensor, hidden: int = 0, steps: int = 1500, wd: float = 1e-2,
               lr: float = 0.02, seed: int = 0):
    """Standardised logistic regression (hidden = 0) or one-hidden-layer SiLU MLP by full-batch Adam ->
    a function features -> logits."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-4)
    x = (features - mean) / std
    g = torch.Generator().manual_seed(seed)
    D = x.shape[1]
    if hidden:
        w1 = (torch.randn(D, hidden, generator=g) / D ** 0.5).requires_grad_()
        b1 = torch.zeros(hidden, requires_grad=True)
        w2 = (torch.randn(hidden, generator=g) / hidden ** 0.5).requires_grad_()
        params = [w1, b1, w2]
    else:
        w = torch.zeros(D, requires_grad=True)
        params = [w]
    b0 = torch.zeros((), requires_grad=True)
    params.append(b0)

    def f(z):
        return torch.nn.functional.silu(z @ w1 + b1) @ w2 + b0 if hidden else z @ w + b0

    opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(f(x), labels.float()).backward()
        opt.step()
    return lambda z: f((z - mean) / std).detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results", help="output directory (default: benchmarks/results)")
    ap.add_argument("--tag", default="router_features", help="output file stem")
    args = ap.parse_args()

    from cascade.bench.datasets import load_dataset, select, split_indices
    from cascade.bench.harness import Bench, BenchConfig
    from cascade.bench.paths import path_features, path_labels
    from cascade.library import Cascade, load_tokenizer
    from cascade.models.llama import LlamaRunner
    from cascade.router import roc_auc

    t_start = time.perf_counter()
    bench = Bench(BenchConfig(progress=False))
    draft = LlamaRunner.from_pretrained(bench.draft_dir, max_rows=1, max_len=2048, device="cpu", dtype="float32")
    encoder = Cascade(draft, draft, load_tokenizer(bench.draft_dir))  # only for encode(): the bench's prompt ids
    tap = _HiddenTap(draft.lm_head)
    draft.lm_head = tap
    split = {"dev": ([], [], []), "test": ([], [], [])}  # hidden, statistics, labels
    for ds, limit in (("humaneval", None), ("gsm8k", 250)):
        problems = select(load_dataset(ds), limit, 0)
        dev_idx = set(split_indices(len(problems), 0.5, 0)[0])
        records = bench.run("draft-only", problems, f"{ds} draft-only")
        paths = bench.paths(problems, records, "draft")
        t0 = time.perf_counter()
        for i, (problem, rec, path) in enumerate(zip(problems, records, paths)):
            prompt = encoder.encode(problem.as_prompt())
            tap.seen.clear()
            with torch.inference_mode():
                draft.forward_span([0], [prompt + list(rec.extra["token_ids"])], num_logits=[len(path)])
            draft.free([0])
            h, s, y = split["dev" if i in dev_idx else "test"]
            h.append(tap.seen[0])
            s.append(path_features(path))
            y.append(path_labels(path))
        print(f"{ds}: hidden states of {len(problems)} answers in {time.perf_counter() - t0:.0f} s", flush=True)
    (Hd, Sd, Yd), (Ht, St, Yt) = ([torch.cat(part) for part in split[name]] for name in ("dev", "test"))
    mu = Hd.mean(0)
    _, _, V = torch.pca_lowrank(Hd - mu, q=64, center=False)
    sets = {"statistics": (Sd, St), "hidden": (Hd, Ht)}
    for q in (8, 32, 64):
        sets[f"hidden top-{q} PCs + statistics"] = (torch.cat([(Hd - mu) @ V[:, :q], Sd], 1), torch.cat([(Ht - mu) @ V[:, :q], St], 1))
    sets["hidden + statistics"] = (torch.cat([Hd, Sd], 1), torch.cat([Ht, St], 1))
    rows = [{"features": "1 - max q (no model)", "model": "-", "train_auc": roc_auc(1 - Sd[:, 0], Yd),
             "test_auc": roc_auc(1 - St[:, 0], Yt)}]
    for name, (Ftr, Fte) in sets.items():
        for model, hidden in (("logistic", 0), ("mlp16", 16)):
            if hidden and "PCs" in name:
                continue
            f = fit_scorer(Ftr, Yd, hidden=hidden)
            rows.append({"features": name, "model": model, "dims": Ftr.shape[1], "train_auc": roc_auc(f(Ftr), Yd),
                         "test_auc": roc_auc(f(Fte), Yt)})
            print(f"{name:<36} {model:<9} train AUC {rows[-1]['train_auc']:.4f}  test AUC {rows[-1]['test_auc']:.4f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": machine_info(), "draft": bench.draft_dir.name, "hidden_size": int(Hd.shape[1]),
               "train": {"positions": int(len(Yd)), "disagreements": int(Yd.sum())},
               "test": {"positions": int(len(Yt)), "disagreements": int(Yt.sum())},
               "rows": rows, "wall_s": time.perf_counter() - t_start}
    (out / f"{args.tag}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / (args.tag + '.json')}")


if __name__ == "__main__":
    main()
