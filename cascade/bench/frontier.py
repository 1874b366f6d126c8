"""The honest frontier: every policy's parameter is chosen on a dev split and reported on the disjoint
test split, on every cost axis, with bootstrap intervals and paired significance tests.

For a family, an axis and a budget b, ``Frontier.select`` picks, among the family's configurations, the
one with the best dev quality whose dev cost on that axis is <= b (ties to the cheaper; draft-only when
none fits), and reports that configuration's figures on the test split. Nothing about the test split
enters the choice: this is what a user who calibrates on their own data gets on new data. Every family
goes through the same rule, request-level routers included.

Axes (all as a fraction of what target-only spends on the same problems, so 1 is target-only):

- ``target_fraction``: target positions processed, prompt prefill included (catch-up, block and bonus in
  the generated region), / target-only's: FLOPs, the compute-bound regime (a loaded server, per-token
  pricing);
- ``passes_per_token``: sequential target forward calls per emitted token: the memory-bound regime (a GPU
  at low batch, where a catch-up prefill costs about one decode step);
- ``scored_fraction``: target positions that decided a token (what Speculative Cascades counts);
- ``modelled_time``: the modelled wall time of both models' passes (``costs.PassCosts``) / target-only's.

Intervals: percentile bootstrap over test problems (resampled with replacement, the same resample for the
policy, draft-only and target-only, so the gap's interval carries the baselines' noise too). Significance:
a paired bootstrap of the quality difference between two policies on the same test problems; a difference
is called significant when its 95 % interval excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from cascade.bench.report import Point, gap_recovered
from cascade.bench.runs import RunRecord
from cascade.bench.scoring import NO_CODE

AXES = {
    "target_fraction": "target FLOPs (prompt prefill + positions incl. catch-up) / target-only",
    "passes_per_token": "target passes per emitted token",
    "scored_fraction": "target positions that decided a token / emitted tokens",
    "modelled_time": "modelled time / target-only",
}
BUDGETS = (0.1, 0.2, 0.3)
REFERENCES = ("oracle",)  # rows shown for reference, never ranked against the policies
# modelled time includes the draft's own passes (a 0.5B step costs ~0.4 of a 1.5B step on the CPU), so
# the draft alone already costs far more than 10 % of target-only's time: that axis gets budgets of its own
AXIS_BUDGETS = {"target_fraction": BUDGETS, "passes_per_token": BUDGETS, "scored_fraction": BUDGETS,
                "modelled_time": (0.6, 0.8, 1.0)}


@dataclass
class Selection:
    """One family at one budget on one axis: the dev choice and its test figures."""

    family: str
    axis: str
    budget: float
    config: str
    dev: Point
    test: Point
    quality_ci: tuple[float, float]
    gap: float | None  # None where draft-only and target-only score the same on test (gap undefined)
    gap_ci: tuple[float, float] | None
    correct: np.ndarray  # [n_test] per-problem scores of the chosen configuration, for paired tests


def bootstrap_indices(n: int, reps: int, seed: int) -> np.ndarray:
    """[reps, n] indices of ``reps`` resamples with replacement of ``n`` problems."""
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


class Frontier:
    """Selections for one dataset. ``runs``: family -> [(config, records over ALL problems, in problem
    order)]; ``make_point(family, config, source, records, target_records)`` aggregates a subset."""

    def __init__(self, dataset: str, runs: dict[str, list[tuple[str, list[RunRecord]]]],
                 draft: Sequence[RunRecord], target: Sequence[RunRecord], dev_idx: Sequence[int],
                 test_idx: Sequence[int], make_point: Callable[..., Point], reps: int = 2000, seed: int = 0) -> None:
        self.dataset, self.runs = dataset, runs
        self.draft, self.target = list(draft), list(target)
        self.dev_idx, self.test_idx = list(dev_idx), list(test_idx)
        self.make_point = make_point
        self.boot = bootstrap_indices(len(self.test_idx), reps, seed)
        self.draft_test = self._scores(self.draft)
        self.target_test = self._scores(self.target)
        self._dev_points: dict[str, list[Point]] = {}
        self.floor_dev = self._point("draft-only", "draft-only", self.draft, self.dev_idx)
        self.floor_test = self._point("draft-only", "draft-only", self.draft, self.test_idx)
        self.target_point_test = self._point("target-only", "target-only", self.target, self.test_idx)

    def _point(self, family: str, config: str, records: Sequence[RunRecord], idx: Sequence[int]) -> Point:
        return self.make_point(family, config, "test" if idx is self.test_idx else "dev",
                               [records[i] for i in idx], [self.target[i] for i in idx])

    def _scores(self, records: Sequence[RunRecord]) -> np.ndarray:
        return np.array([records[i].correct for i in self.test_idx], dtype=np.float64)

    def dev_points(self, family: str) -> list[Point]:
        if family not in self._dev_points:
            self._dev_points[family] = [self._point(family, cfg, recs, self.dev_idx) for cfg, recs in self.runs[family]]
        return self._dev_points[family]

    def select(self, family: str, axis: str, budget: float) -> Selection:
        pts = self.dev_points(family)
        fits = [i for i, p in enumerate(pts) if getattr(p, axis) <= budget + 1e-9]
        if fits:
            best = max(fits, key=lambda i: (pts[i].quality, -getattr(pts[i], axis)))
            config, records, dev = self.runs[family][best][0], self.runs[family][best][1], pts[best]
        else:  # nothing of this family fits: the user would run the draft alone
            config, records, dev = "draft-only", self.draft, self.floor_dev
        test = self._point(family, config, records, self.test_idx)
        correct = self._scores(records)
        b = self.boot
        q_draft, q_target = self.draft_test.mean(), self.target_test.mean()
        quality_ci = percentile_ci(correct[b].mean(axis=1))
        if math.isclose(q_draft, q_target):
            gap, gap_ci = None, None
        else:
            qd, qt, qc = self.draft_test[b].mean(axis=1), self.target_test[b].mean(axis=1), correct[b].mean(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                boot_gap = np.where(np.isclose(qt, qd), np.nan, (qc - qd) / (qt - qd))
            gap, gap_ci = gap_recovered(test.quality, q_draft, q_target), percentile_ci(boot_gap)
        return Selection(family, axis, budget, config, dev, test, quality_ci, gap, gap_ci, correct)

    def paired_difference(self, a: Selection, b: Selection) -> tuple[float, tuple[float, float]]:
        """Test quality of a minus b, and its paired bootstrap 95 % interval."""
        diff = a.correct - b.correct
        return float(diff.mean()), percentile_ci(diff[self.boot].mean(axis=1))

    def reference_ci(self, scores: np.ndarray) -> tuple[float, float]:
        return percentile_ci(scores[self.boot].mean(axis=1))


def pct(x: float | None) -> str:
    return "undefined" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def ci(pair: tuple[float, float] | None) -> str:
    if pair is None or any(math.isnan(v) for v in pair):
        return ""
    return f" [{100 * pair[0]:.0f}, {100 * pair[1]:.0f}]"


def frontier_markdown(fr: Frontier, families: Sequence[str], axes: Sequence[str] = tuple(AXES)) -> tuple[str, list[Selection]]:
    """The dataset's report section: references with intervals, then per axis a table of gap recovered
    on the test split (95 % interval) at each budget, the chosen configurations, and which differences
    from the best policy at each budget are significant. Returns the Markdown and every selection."""
    qd, qt = fr.draft_test.mean(), fr.target_test.mean()
    n_test, n_dev = len(fr.test_idx), len(fr.dev_idx)
    lines = [f"### {fr.dataset}: test split (n = {n_test}; parameters chosen on the dev split, n = {n_dev})", "",
             f"draft-only {pct(qd)}{ci(fr.reference_ci(fr.draft_test))} · target-only {pct(qt)}"
             f"{ci(fr.reference_ci(fr.target_test))} (95 % bootstrap intervals)", ""]
    no_code = {name: sum(1 for r in recs if r.score_detail == NO_CODE) for name, recs in
               (("draft-only", fr.draft), ("target-only", fr.target))}
    if any(no_code.values()):
        n_all = len(fr.draft)
        lines += ["Answers with no runnable code (prose, or an empty answer; scored as failures): "
                  + ", ".join(f"{name} {k} of {n_all}" for name, k in no_code.items()) + ".", ""]
    if math.isclose(qd, qt):
        lines += ["**Draft-only and target-only score the same on this test split: the gap recovered is undefined, "
                  "so no gap is reported; read the quality columns.**", ""]
    selections: list[Selection] = []
    for axis in axes:
        budgets = AXIS_BUDGETS[axis]
        lines += [f"#### budget on {AXES[axis]} (`{axis}`)", "",
                  "| policy | " + " | ".join(f"gap @ {int(100 * b)} % (quality)" for b in budgets) + " | configs (dev choice) |",
                  "|" + "---|" * (len(budgets) + 2)]
        by_budget: dict[float, list[Selection]] = {b: [] for b in budgets}
        for fam in families:
            if fam not in fr.runs:
                continue
            row = [fr.select(fam, axis, b) for b in budgets]
            for b, s in zip(budgets, row):
                by_budget[b].append(s)
            selections += row
            cells = [f"{pct(s.gap)}{ci(s.gap_ci)} ({pct(s.test.quality)}, cost {getattr(s.test, axis):.3f})" for s in row]
            configs = " · ".join(f"`{s.config}`" for s in row)
            lines.append(f"| {fam} | " + " | ".join(cells) + f" | {configs} |")
        lines.append("")
        for b in budgets:
            sel = [s for s in by_budget[b] if s.family not in REFERENCES]  # the oracle is a bound, not a policy
            if not sel:
                continue
            best = max(sel, key=lambda s: s.test.quality)
            notes = []
            for s in sel:
                if s is best:
                    continue
                d, (lo, hi) = fr.paired_difference(best, s)
                sig = "significant" if (lo > 0 or hi < 0) else "not significant"
                notes.append(f"{s.family} {100 * d:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}] {sig}")
            lines.append(f"- at {int(100 * b)} %: best test quality **{best.family}** ({pct(best.test.quality)}); "
                         "its lead over " + ("; ".join(notes) if notes else "no other policy"))
        lines.append("")
    return "\n".join(lines) + "\n", selections
