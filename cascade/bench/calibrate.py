"""Calibration: pick the parameter of a policy that meets a target-token budget on a dev split, then
report what it really does on a disjoint test split.

``choose_config`` is the rule, on points (one per configuration): the highest quality among those whose
``target_token_fraction`` is within the budget, ties to the cheaper. ``sweep_points`` builds those points
by replay from recorded answers (no model needed, so the rule is testable on synthetic statistics);
``calibrate`` runs the whole procedure on the real pair: dev baselines + replay sweep → choice → real runs
of the choice and both baselines on the test split. The chosen policy string goes straight to
``cascade generate --policy`` (and the server's ``--policy``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cascade.bench.replay import PathStats
from cascade.bench.report import Point, aggregate, gap_recovered
from cascade.bench.runs import RunRecord
from cascade.bench.sweeps import REQUEST_LEVEL, sweep_records


def choose_config(points: Sequence[Point], budget: float, axis: str = "target_fraction") -> Point:
    """The best point within ``budget`` on ``axis`` (a ``frontier.AXES`` name), ties to the cheaper;
    ValueError (naming ``budget``) when none fits."""
    if not 0.0 <= budget:
        raise ValueError(f"budget must be >= 0, got {budget!r}")
    fits = [p for p in points if getattr(p, axis) <= budget + 1e-9]
    if not fits:
        cheapest = min(points, key=lambda p: getattr(p, axis))
        raise ValueError(f"budget {budget:.3f}: no configuration fits on {axis}; the cheapest uses "
                         f"{getattr(cheapest, axis):.3f} ({cheapest.config})")
    return max(fits, key=lambda p: (p.quality, -getattr(p, axis)))


def sweep_points(family: str, dataset: str, problems, draft: Sequence[RunRecord], target: Sequence[RunRecord],
                 dpaths: Sequence[PathStats], tpaths: Sequence[PathStats], draft_params: int,
                 target_params: int, costs=None) -> list[Point]:
    """One replayed (token-level) or derived (request-level) point per grid configuration, the same
    records ``cascade bench`` sweeps (``sweeps.sweep_records``)."""
    runs = sweep_records([family], problems, draft, target, dpaths, tpaths, dpaths)[family]
    source = "derived" if family in REQUEST_LEVEL else "replay"
    return [aggregate(dataset, family, config, source, recs, target, draft_params, target_params, costs)
            for config, recs in runs]


@dataclass
class Calibration:
    policy: str  # the chosen configuration, a policy string for --policy
    budget: float
    axis: str  # the budget's cost axis (cascade.bench.frontier.AXES)
    dev: Point  # replayed on the dev split
    test: Point  # real run on the test split
    test_draft: Point
    test_target: Point

    def summary(self) -> dict:
        gap = gap_recovered(self.test.quality, self.test_draft.quality, self.test_target.quality)
        cost = lambda p: getattr(p, self.axis)  # noqa: E731
        return {"policy": self.policy, "budget": self.budget, "axis": self.axis,
                "dev": {"n": self.dev.n, "quality": self.dev.quality, "target_fraction": self.dev.target_fraction, "source": self.dev.source},
                "test": {"n": self.test.n, "quality": self.test.quality, "target_fraction": self.test.target_fraction,
                         "relative_cost": self.test.relative_cost, "tokens_per_s": self.test.tokens_per_s, "gap_recovered": gap,
                         "draft_only_quality": self.test_draft.quality, "target_only_quality": self.test_target.quality},
                "dev_cost": cost(self.dev), "test_cost": cost(self.test),
                "meets_budget_on_test": cost(self.test) <= self.budget + 1e-9}


def calibrate(bench, family: str, budget: float, dataset: str, problems, dev_fraction: float = 0.5,
              seed: int = 0, axis: str = "target_fraction") -> Calibration:
    """Dev split: baselines + replay sweep → choice. Test split: real runs of the choice and baselines."""
    from cascade.bench.datasets import split

    dev, test = split(problems, dev_fraction, seed)
    bench.say(f"[calibrate] {family} for budget {budget:.0%} on {dataset}: dev {len(dev)}, test {len(test)} problems")
    d_draft = bench.run("draft-only", dev, "dev draft-only")
    d_target = bench.run("target-only", dev, "dev target-only")
    dpaths = bench.paths(dev, d_draft, "draft")
    tpaths = bench.paths(dev, d_target, "target")
    points = sweep_points(family, dataset, dev, d_draft, d_target, dpaths, tpaths, bench.draft_params, bench.target_params,
                          bench.costs)
    chosen = choose_config(points, budget, axis)
    bench.say(f"[calibrate] dev choice: {chosen.config} (replayed: quality {chosen.quality:.3f}, target fraction {chosen.target_fraction:.3f})")
    t_draft = bench.run("draft-only", test, "test draft-only")
    t_target = bench.run("target-only", test, "test target-only")
    t_real = bench.run(chosen.config, test, f"test {chosen.config}")
    pt = lambda recs, src, cfg: aggregate(dataset, family, cfg, src, recs, t_target, bench.draft_params, bench.target_params)  # noqa: E731
    return Calibration(policy=chosen.config, budget=budget, axis=axis, dev=chosen, test=pt(t_real, "real", chosen.config),
                       test_draft=pt(t_draft, "real", "draft-only"), test_target=pt(t_target, "real", "target-only"))


def write_calibration(cal: Calibration, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal.summary(), indent=1))
