"""Benchmark figures: aggregate records into points on the quality / cost plane, gap recovered at target-
token budgets, and the CSV, Markdown and PNG outputs.

Definitions (DESIGN.md, "Cost accounting"), per dataset, summed over its problems:

- quality: mean score (pass@1 for HumanEval, exact match for GSM8K).
- target_token_fraction: target-processed generated positions (catch-up + block + bonus positions, or one
  per target-only step) / emitted tokens. Prompt prefill is counted apart.
- relative_cost: FLOPs of both models (2 * params * positions, prompts included) / FLOPs of the real
  target-only run on the same problems, so target-only is exactly 1.
- target_scored_fraction: target positions that scored a token (block + bonus / replacement positions,
  held-back tokens checked) / emitted tokens: target_token_fraction without the catch-up, i.e. the share of
  tokens the target was consulted on (what the Speculative Cascades paper counts as large-model calls; on a
  GPU the catch-up runs as a parallel prefill and costs little latency).
- gap recovered: (Q - Q_draft) / (Q_target - Q_draft).
- gap recovered at budget b: the best quality among a policy's points whose target_token_fraction (or,
  on the second axis, target_scored_fraction) <= b
  (draft-only, the policy at its most permissive, is always available), so it is a value the user can
  actually get by calibrating; AUC is its mean over budgets 0, 0.01, ..., 1.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cascade.bench.runs import RunRecord

BUDGETS = (0.1, 0.2, 0.3, 0.5)


@dataclass
class Point:
    """One policy configuration on one dataset."""

    dataset: str
    family: str  # policy name, e.g. "chow"
    config: str  # Policy.describe() (or a description for derived points)
    source: str  # "real" | "replay" | "derived"
    n: int
    quality: float
    target_fraction: float
    relative_cost: float
    scored_fraction: float = 0.0
    tokens_per_s: float | None = None  # real runs only
    exact_share: float | None = None  # replay: share of problems whose figures are exact (not estimated)
    ref_draft_quality: float | None = None  # draft-only / target-only quality on the same problems, when the
    ref_target_quality: float | None = None  #   point covers a subset (real runs at the reported budget)
    ref_draft_tokens_per_s: float | None = None  # draft-only / target-only throughput on the same problems,
    ref_target_tokens_per_s: float | None = None  #   timed right before the real runs

    @property
    def gap(self) -> float:
        """Gap recovered against the baselines on the same problems (NaN without them)."""
        if self.ref_draft_quality is None or self.ref_target_quality is None:
            return float("nan")
        return gap_recovered(self.quality, self.ref_draft_quality, self.ref_target_quality)


def aggregate(dataset: str, family: str, config: str, source: str, records: Sequence[RunRecord],
              target_only: Sequence[RunRecord], draft_params: int, target_params: int) -> Point:
    """One point from per-problem records; ``target_only`` are the real target-only records of the same
    problems (the cost denominator)."""
    if not records:
        raise ValueError(f"no records for {family} on {dataset}")
    emitted = sum(r.emitted_tokens for r in records)
    flops = sum(r.flops(draft_params, target_params) for r in records)
    base = sum(r.flops(draft_params, target_params) for r in target_only)
    time_s = sum(r.time_share_s for r in records)
    exact = None
    if source == "replay":
        exact = sum(1 for r in records if r.mode != "replay-estimate") / len(records)
    return Point(
        dataset=dataset, family=family, config=config, source=source, n=len(records),
        quality=sum(r.correct for r in records) / len(records),
        target_fraction=sum(r.target_tokens for r in records) / max(1, emitted),
        scored_fraction=sum(r.scored for r in records) / max(1, emitted),
        relative_cost=flops / base if base else float("nan"),
        tokens_per_s=(emitted / time_s) if source == "real" and time_s > 0 else None,
        exact_share=exact,
    )


def gap_recovered(quality: float, q_draft: float, q_target: float) -> float:
    if math.isclose(q_target, q_draft):
        return float("nan")
    return (quality - q_draft) / (q_target - q_draft)


def best_within(points: Iterable[Point], budget: float, floor: Point, axis: str = "target_fraction") -> Point:
    """The highest-quality point with ``axis`` <= budget (ties: the cheaper one); ``floor`` (the draft-only
    point) when none fits."""
    fits = [p for p in points if getattr(p, axis) <= budget + 1e-9]
    return max([floor] + fits, key=lambda p: (p.quality, -getattr(p, axis)))


def gap_curve(points: Sequence[Point], floor: Point, q_draft: float, q_target: float,
              budgets: Sequence[float], axis: str = "target_fraction") -> list[float]:
    return [gap_recovered(best_within(points, b, floor, axis).quality, q_draft, q_target) for b in budgets]


def auc(points: Sequence[Point], floor: Point, q_draft: float, q_target: float, axis: str = "target_fraction") -> float:
    grid = [i / 100 for i in range(101)]
    values = gap_curve(points, floor, q_draft, q_target, grid, axis)
    return sum(values) / len(values)


def pareto(points: Sequence[Point], x: str = "relative_cost") -> list[Point]:
    """Points not dominated on (lower x, higher quality), sorted by x."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (getattr(p, x), -p.quality)):
        if not out or p.quality > out[-1].quality + 1e-12:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------- outputs
def write_csv(points: Sequence[Point], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(points[0]).keys()))
        w.writeheader()
        for p in points:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(p).items()})


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f} %" if pct else f"{x:.3g}"


def budget_table(dataset: str, families: dict[str, list[Point]], refs: dict[str, Point],
                 real_at: dict[str, Point]) -> str:
    """Markdown: per policy, gap recovered at each budget + AUC, and the real run at the 20 % budget."""
    qd, qt = refs["draft-only"].quality, refs["target-only"].quality
    floor = refs["draft-only"]
    head = ("| policy | " + " | ".join(f"gap @ {int(100 * b)} %" for b in BUDGETS)
            + " | AUC | config @ 20 % | real run: quality (gap vs the same problems) | target frac (real) | scored frac (real) | rel. cost (real) | tok/s (real) |")
    lines = [f"### {dataset}", "",
             f"draft-only {_fmt(refs['draft-only'].quality, True)} · target-only {_fmt(refs['target-only'].quality, True)}"
             f" · oracle {_fmt(refs['oracle'].quality, True)} at target fraction {_fmt(refs['oracle'].target_fraction, True)}"
             f" · n = {floor.n}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for fam, pts in sorted(families.items()):
        gaps = gap_curve(pts, floor, qd, qt, BUDGETS)
        chosen = best_within(pts, 0.2, floor)
        real = real_at.get(fam)
        lines.append(
            f"| {fam} | " + " | ".join(_fmt(g, True) for g in gaps) + f" | {_fmt(auc(pts, floor, qd, qt), True)} | "
            f"`{chosen.config}` | "
            + (f"`{real.config}`: {_fmt(real.quality, True)} (gap {_fmt(real.gap, True)}, n = {real.n}) | "
               f"{_fmt(real.target_fraction, True)} | {_fmt(real.scored_fraction, True)} | {_fmt(real.relative_cost)} | "
               f"{_fmt(real.tokens_per_s)} (draft-only {_fmt(real.ref_draft_tokens_per_s)}, target-only "
               f"{_fmt(real.ref_target_tokens_per_s)}) |" if real else "– | – | – | – | – |"))
    lines += ["", "Same sweeps on the *scored* axis (budget on target_scored_fraction: catch-up not counted):", "",
              "| policy | " + " | ".join(f"gap @ {int(100 * b)} %" for b in BUDGETS) + " | AUC | config @ 20 % | its target frac (with catch-up) |",
              "|" + "---|" * (len(BUDGETS) + 4)]
    for fam, pts in sorted(families.items()):
        gaps = gap_curve(pts, floor, qd, qt, BUDGETS, "scored_fraction")
        chosen = best_within(pts, 0.2, floor, "scored_fraction")
        lines.append(f"| {fam} | " + " | ".join(_fmt(g, True) for g in gaps)
                     + f" | {_fmt(auc(pts, floor, qd, qt, 'scored_fraction'), True)} | `{chosen.config}` | {_fmt(chosen.target_fraction, True)} |")
    lines += ["", "Reference points:", "", "| | config | quality | target frac | scored frac | rel. cost | tok/s |", "|---|---|---|---|---|---|---|"]
    for name in ("draft-only", "target-only", "oracle"):
        r = refs[name]
        lines.append(f"| *{name}* | `{r.config}` | {_fmt(r.quality, True)} | {_fmt(r.target_fraction, True)} | "
                     f"{_fmt(r.scored_fraction, True)} | {_fmt(r.relative_cost)} | {_fmt(r.tokens_per_s)} |")
    return "\n".join(lines) + "\n"


def plot(datasets: Sequence[str], families: dict[str, dict[str, list[Point]]], refs: dict[str, dict[str, Point]],
         real: dict[str, list[Point]], path: Path, title: str) -> None:
    """Row 1: quality vs relative cost (Pareto line per policy, replayed); rows 2-3: gap recovered vs the
    target-token and the scored-token budget. Squares (rows 2-3): real runs, whose gap is against the
    baselines on the same (sub)set of problems; stars: draft-only / target-only / oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(datasets), figsize=(6.5 * len(datasets), 14), squeeze=False)
    colors = {}
    cmap = plt.get_cmap("tab10")
    for j, ds in enumerate(datasets):
        qd, qt = refs[ds]["draft-only"].quality, refs[ds]["target-only"].quality
        top, bottom, scored = axes[0][j], axes[1][j], axes[2][j]
        for i, (fam, pts) in enumerate(sorted(families[ds].items())):
            color = colors.setdefault(fam, cmap(len(colors) % 10))
            front = pareto(pts)
            top.plot([p.relative_cost for p in front], [p.quality for p in front], "-o", ms=3, color=color, label=fam, alpha=0.85)
            grid = [b / 100 for b in range(101)]
            bottom.step(grid, gap_curve(pts, refs[ds]["draft-only"], qd, qt, grid), where="post", color=color, label=fam)
            scored.step(grid, gap_curve(pts, refs[ds]["draft-only"], qd, qt, grid, "scored_fraction"), where="post",
                        color=color, label=fam)
        for p in real.get(ds, []):
            color = colors.setdefault(p.family, cmap(len(colors) % 10))
            bottom.plot([p.target_fraction], [p.gap], "s", ms=8, color=color, markeredgecolor="black")
            scored.plot([p.scored_fraction], [p.gap], "s", ms=8, color=color, markeredgecolor="black")
        for name, marker in (("draft-only", "*"), ("target-only", "*"), ("oracle", "P")):
            r = refs[ds][name]
            top.plot([r.relative_cost], [r.quality], marker, ms=13, color="black")
            top.annotate(name, (r.relative_cost, r.quality), textcoords="offset points", xytext=(6, -10), fontsize=8)
        top.set_title(f"{ds}: quality vs relative cost (n = {refs[ds]['draft-only'].n})")
        top.set_xlabel("relative cost (FLOPs / target-only FLOPs)")
        top.set_ylabel("quality")
        top.grid(alpha=0.3)
        bottom.set_title(f"{ds}: gap recovered vs target-token budget")
        bottom.set_xlabel("target_token_fraction budget")
        bottom.set_ylabel("gap recovered")
        scored.set_title(f"{ds}: gap recovered vs scored-token budget (catch-up not counted)")
        scored.set_xlabel("target_scored_fraction budget")
        scored.set_ylabel("gap recovered")
        for ax in (bottom, scored):
            for b in BUDGETS:
                ax.axvline(b, color="grey", lw=0.5, ls=":")
            ax.set_xlim(0, 1.0)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title + "\nlines: replayed / derived sweeps (Pareto front) · squares: real runs at the budget on the real-run subset, gap vs the baselines on that subset · stars: draft/target-only · P: oracle", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
