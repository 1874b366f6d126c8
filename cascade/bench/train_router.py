"""``cascade train-router``: train the learned deferral router (``cascade.router``) on the dev splits and
report how well it predicts disagreement on the test splits, against the draft's max-prob.

Data: for every problem of each dataset's seeded sample, the draft-only answer and its teacher-forced
statistics (``Bench.run`` / ``Bench.paths``, cached: the same records ``cascade bench`` uses). Positions
of dev-split answers train; positions of test-split answers measure. Label: the target's greedy token
differs from the draft's at that position. Nothing of a test split is seen in training, and MBPP is not a
dataset here (it is reserved for checking transfer).

Output: the router file next to the draft model (``ROUTER_FILE``, where ``Cascade.from_pretrained`` and
``cascade bench`` find it) and a JSON report: per dataset and pooled, test AUC of the router and of
``1 - max q``, and the router's scoring cost per round.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cascade.bench.datasets import split_indices
from cascade.bench.paths import path_features, path_labels
from cascade.router import ROUTER_FILE, DeferralRouter, roc_auc, router_features, train_router


@dataclass
class RouterReport:
    router: DeferralRouter
    summary: dict


def measure_cost(router: DeferralRouter, rows: int, reps: int = 2000) -> float:
    """Microseconds per ``score`` call over ``rows`` drafted positions (the engine scores one batch's block
    per round), on the router's device."""
    g = torch.Generator().manual_seed(0)
    mp = torch.rand(rows, generator=g).to(router.device)
    args = (mp, mp * 0.5, torch.rand(rows, generator=g).to(router.device), mp.log())
    for _ in range(20):
        router.score(*args)
    if router.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        router.score(*args)
    if router.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def train_on_bench(bench, datasets: dict[str, list], dev_fraction: float = 0.5, seed: int = 0, hidden: int = 16,
                   steps: int = 400, say: Callable[[str], None] = print) -> RouterReport:
    """Train on the dev splits of ``datasets`` (name -> problems), measure on the test splits."""
    feats, labels, tests = [], [], {}
    for ds, problems in datasets.items():
        dev_idx, test_idx = split_indices(len(problems), dev_fraction, seed)
        draft = bench.run("draft-only", problems, f"{ds} draft-only")
        paths = bench.paths(problems, draft, "draft")
        for i in dev_idx:
            feats.append(path_features(paths[i]))
            labels.append(path_labels(paths[i]))
        tests[ds] = ([path_features(paths[i]) for i in test_idx], [path_labels(paths[i]) for i in test_idx])
        say(f"[train-router] {ds}: {len(dev_idx)} dev answers train, {len(test_idx)} test answers measure")
    x, y = torch.cat(feats), torch.cat(labels)
    router = train_router(x, y, hidden=hidden, steps=steps, seed=seed,
                          info={"datasets": list(datasets), "dev_fraction": dev_fraction, "seed": seed,
                                "labels": "argmax p != argmax q along the draft's own answers (teacher forcing)"})
    out = {"train": {"positions": int(len(y)), "disagreements": int(y.sum()), "datasets": list(datasets)},
           "test_auc": {}}
    pooled_s, pooled_m, pooled_y = [], [], []
    for ds, (fx, fy) in tests.items():
        tx, ty = torch.cat(fx), torch.cat(fy)
        s = torch.sigmoid(router.logits(tx)).cpu()
        m = 1.0 - tx[:, 0]  # 1 - max q
        out["test_auc"][ds] = {"positions": int(len(ty)), "disagreements": int(ty.sum()),
                               "router": roc_auc(s, ty), "max_prob": roc_auc(m, ty)}
        pooled_s.append(s), pooled_m.append(m), pooled_y.append(ty)
    out["test_auc"]["pooled"] = {"router": roc_auc(torch.cat(pooled_s), torch.cat(pooled_y)),
                                 "max_prob": roc_auc(torch.cat(pooled_m), torch.cat(pooled_y))}
    out["cost_us_per_round"] = {str(rows): measure_cost(router, rows) for rows in (5, 40, 160)}
    out["parameters"] = int(router.w1.numel() + router.b1.numel() + router.w2.numel() + 1)
    router.info = {**router.info, "test_auc": out["test_auc"]}
    return RouterReport(router, out)


def run_train_router(bench, datasets: dict[str, list], out_router: Path | None, out_report: Path,
                     dev_fraction: float = 0.5, seed: int = 0, hidden: int = 16, steps: int = 400) -> RouterReport:
    """Train, save the router (default: next to the draft model) and the report; returns both."""
    rep = train_on_bench(bench, datasets, dev_fraction, seed, hidden, steps, say=bench.say)
    path = rep.router.save(out_router or Path(bench.draft_dir) / ROUTER_FILE)
    rep.summary["router_file"] = str(path)
    rep.summary["fingerprint"] = rep.router.info["fingerprint"]
    out_report.parent.mkdir(parents=True, exist_ok=True)
    out_report.write_text(json.dumps(rep.summary, indent=1) + "\n")
    return rep


__all__ = ["RouterReport", "measure_cost", "router_features", "run_train_router", "train_on_bench"]
