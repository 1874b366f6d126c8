"""Benchmark figures: aggregate records into points on the quality / cost plane, gap recovered at
budgets, and the CSV (the dev/test selection and its intervals live in ``frontier``, the plot in ``plot``).

Definitions (DESIGN.md, "Cost accounting"), per dataset, summed over its problems:

- quality: mean score (pass@1 for HumanEval, exact match for GSM8K).
- target_fraction (the target-FLOPs axis): every position the target processed, its prompt prefill
  included (paid by each request the target touches at all), plus the generated-region positions (catch-up
  + block + bonus, or one per target-only step), / the same sum of the real target-only run on the same
  problems, so target-only is 1. Until 2026-12 the axis left the prompt prefill out and divided by the
  policy's own emitted tokens; that made a policy which escalates a little in many requests look several
  times cheaper than it is (each such request makes the target prefill its whole prompt), so it favoured
  token-level policies over request-level routers, which pay the prefill only for the requests they
  route.
- relative_cost: FLOPs of both models (2 * params * positions, prompts included) / FLOPs of the real
  target-only run on the same problems, so target-only is exactly 1.
- target_scored_fraction: target positions that scored a token (block + bonus / replacement positions,
  held-back tokens checked) / emitted tokens: target_token_fraction without the catch-up, i.e. the share of
  tokens the target was consulted on (what the Speculative Cascades paper counts as large-model calls; on a
  GPU the catch-up runs as a parallel prefill and costs little latency).
- passes_per_token: sequential target forward calls / emitted tokens (the memory-bound regime).
- stock_remote_fraction: target positions when the target sits behind a route without prefix reuse (a
  stock vLLM OpenAI server: every pass recomputes its whole sequence) / target-only's positions.
- modelled_time: modelled time of both models' passes (``costs.PassCosts``) / target-only's: each
  request's end-to-end latency alone on the machine, summed.
- ttft: the mean modelled time to first token (``PassCosts.ttft_ms``) / draft-only's on the same problems
  (a streamed request's wait; a request-level router pays its draft's whole answer first). ``ttft_ms`` and
  ``latency_ms`` are the means in milliseconds; ``ttft_s`` / ``latency_s`` the measured means of real runs
  (from admission into the running batch, at the run's batch size).
- gap recovered: (Q - Q_draft) / (Q_target - Q_draft), undefined (NaN) when Q_target = Q_draft.
- gap recovered at budget b: the best quality among a policy's points whose target_fraction (or another
  axis) <= b
  (draft-only, the policy at its most permissive, is always available), so it is a value the user can
  actually get by calibrating; AUC is its mean over budgets 0, 0.01, ..., 1.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from cascade.bench.runs import RunRecord

if TYPE_CHECKING:
    from cascade.bench.costs import PassCosts

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
    passes_per_token: float = 0.0  # sequential target forward calls / emitted tokens (memory-bound regime)
    stock_remote_fraction: float = float("nan")  # target positions over a route without prefix reuse (each pass
    #   recomputes its whole sequence: a stock vLLM OpenAI server) / target-only's positions; NaN where a
    #   record predates the counter
    modelled_time: float = float("nan")  # modelled time (``costs.PassCosts``) / target-only's on the same problems
    ttft: float = float("nan")  # mean modelled time to first token / draft-only's on the same problems
    ttft_ms: float = float("nan")  # mean modelled time to first token per request
    latency_ms: float = float("nan")  # mean modelled end-to-end latency per request
    ttft_s: float | None = None  # measured means (real runs), from admission into the running batch
    latency_s: float | None = None
    emitted_mean: float = 0.0  # mean answer length, tokens
    tokens_per_s: float | None = None  # real runs only
    exact_share: float | None = None  # share of problems whose figures are exact (real, derived or an exact
    #   replay), not a replay estimate
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
              target_only: Sequence[RunRecord], draft_params: int, target_params: int,
              costs: "PassCosts | None" = None, draft_only: Sequence[RunRecord] | None = None) -> Point:
    """One point from per-problem records; ``target_only`` are the real target-only records of the same
    problems (the cost denominator of the relative figures), ``draft_only`` the draft-only ones (the
    denominator of the time-to-first-token axis; without them that axis is NaN)."""
    if not records:
        raise ValueError(f"no records for {family} on {dataset}")
    emitted = sum(r.emitted_tokens for r in records)
    target_positions = sum(r.target_tokens + r.target_prefill_tokens for r in records)
    target_base = sum(t.target_tokens + t.target_prefill_tokens for t in target_only)
    flops = sum(r.flops(draft_params, target_params) for r in records)
    base = sum(r.flops(draft_params, target_params) for r in target_only)
    time_s = sum(r.time_share_s for r in records)
    exact = sum(1 for r in records if r.mode != "replay-estimate") / len(records)
    n = len(records)
    ttft_ms = latency_ms = ttft = float("nan")
    if costs is not None:
        ttft_ms = sum(map(costs.ttft_ms, records)) / n
        latency_ms = sum(map(costs.record_ms, records)) / n
        if draft_only:
            base_ttft = sum(map(costs.ttft_ms, draft_only)) / len(draft_only)
            ttft = ttft_ms / base_ttft if base_ttft > 0 else float("nan")
    measured = [r for r in records if r.ttft_s is not None and r.latency_s is not None]
    stateless = [r.stateless for r in records]
    return Point(
        dataset=dataset, family=family, config=config, source=source, n=len(records),
        quality=sum(r.correct for r in records) / len(records),
        target_fraction=target_positions / target_base if target_base else float("nan"),
        scored_fraction=sum(r.scored for r in records) / max(1, emitted),
        relative_cost=flops / base if base else float("nan"),
        passes_per_token=sum(r.passes for r in records) / max(1, emitted),
        stock_remote_fraction=(sum(stateless) / target_base if target_base and None not in stateless else float("nan")),
        modelled_time=(sum(map(costs.record_ms, records)) / max(1e-9, sum(map(costs.record_ms, target_only)))
                       if costs is not None else float("nan")),
        tokens_per_s=(emitted / time_s) if source == "real" and time_s > 0 else None,
        exact_share=exact, ttft=ttft, ttft_ms=ttft_ms, latency_ms=latency_ms,
        ttft_s=sum(r.ttft_s for r in measured) / len(measured) if measured and source == "real" else None,
        latency_s=sum(r.latency_s for r in measured) / len(measured) if measured and source == "real" else None,
        emitted_mean=emitted / n,
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
        w = csv.DictWriter(f, fieldnames=[fd.name for fd in fields(Point)])  # a header even with no points
        w.writeheader()
        for p in points:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(p).items()})
