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
- ``modelled_time``: the modelled wall time of both models' passes (``costs.PassCosts``) / target-only's:
  the batch-1 end-to-end latency axis;
- ``ttft``: the modelled time to first token / draft-only's (a streamed request's wait);
- ``stock_remote_fraction``: target positions when the target is reached over a route without prefix reuse
  (a stock vLLM OpenAI server recomputes the whole sequence on every pass; ``cascade target-serve``'s verify
  endpoint does not, and is priced by ``target_fraction``) / target-only's positions (one generate call).

Intervals: percentile bootstrap over test problems (resampled with replacement, the same resample for the
policy, draft-only and target-only, so the gap's interval carries the baselines' noise too; a replay
estimate's fractional score is drawn as an outcome in each resample); a selection
also carries its modelled time to first token (÷ draft-only's) and latency (÷ target-only's) with their
intervals. Significance: every comparison of two policies is paired on the same test problems
(``paired.compare``: paired bootstrap interval of the difference, and McNemar's exact test where scores
are 0/1); a lead is significant when the interval excludes 0 and McNemar's p < 0.05 agrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from cascade.bench.paired import (PairedResult, compare, detectable_difference, min_significant_difference, percentile_ci,
                                  resample_means)
from cascade.bench.report import Point, gap_recovered
from cascade.bench.runs import RunRecord
from cascade.bench.scoring import NO_ANSWER, NO_BOX, NO_CODE

AXES = {
    "target_fraction": "target FLOPs (prompt prefill + positions incl. catch-up) / target-only",
    "passes_per_token": "target passes per emitted token",
    "scored_fraction": "target positions that decided a token / emitted tokens",
    "modelled_time": "modelled time (batch-1 end-to-end latency) / target-only",
    "ttft": "modelled time to first token / draft-only",
    "stock_remote_fraction": "target positions behind a stock OpenAI route (each pass recomputes its sequence) / target-only",
}
BUDGETS = (0.1, 0.2, 0.3)
REFERENCES = ("oracle",)  # rows shown for reference, never ranked against the policies
# modelled time includes the draft's own passes (a 0.5B step costs ~0.4 of a 1.5B step on the CPU), so
# the draft alone already costs far more than 10 % of target-only's time: that axis gets budgets of its own
AXIS_BUDGETS = {"target_fraction": BUDGETS, "passes_per_token": BUDGETS, "scored_fraction": BUDGETS,
                "modelled_time": (0.6, 0.8, 1.0), "ttft": (1.5, 3.0, 10.0),
                # a pass there costs a prefill of the whole sequence: token-level escalations cost many times
                # target-only's (one generate call), so this axis needs budgets above 1
                "stock_remote_fraction": (1.0, 3.0, 10.0)}
REQUEST_BASELINE = "quantile"  # the request-level router every token-level family is compared with


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
    ttft_ci: tuple[float, float] = (math.nan, math.nan)  # of test.ttft (modelled, ÷ draft-only's)
    latency_ci: tuple[float, float] = (math.nan, math.nan)  # of test.modelled_time (÷ target-only's)


def bootstrap_indices(n: int, reps: int, seed: int) -> np.ndarray:
    """[reps, n] indices of ``reps`` resamples with replacement of ``n`` problems."""
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


class Frontier:
    """Selections for one dataset. ``runs``: family -> [(config, records over ALL problems, in problem
    order)]; ``make_point(family, config, source, records, target_records, draft_records)`` aggregates a
    subset; ``costs`` (``costs.PassCosts``) prices each record for the latency intervals (None: no latency)."""

    def __init__(self, dataset: str, runs: dict[str, list[tuple[str, list[RunRecord]]]],
                 draft: Sequence[RunRecord], target: Sequence[RunRecord], dev_idx: Sequence[int],
                 test_idx: Sequence[int], make_point: Callable[..., Point], reps: int = 2000, seed: int = 0,
                 costs=None) -> None:
        self.dataset, self.runs = dataset, runs
        self.draft, self.target = list(draft), list(target)
        self.dev_idx, self.test_idx = list(dev_idx), list(test_idx)
        self.make_point, self.costs = make_point, costs
        self.boot = bootstrap_indices(len(self.test_idx), reps, seed)
        self.draft_test = self._scores(self.draft)
        self.target_test = self._scores(self.target)
        self.draft_ttft_test = self._times(self.draft, "ttft_ms")
        self.target_latency_test = self._times(self.target, "record_ms")
        self._dev_points: dict[str, list[Point]] = {}
        self._tested: dict[tuple[str, str], tuple] = {}
        self.floor_dev = self._point("draft-only", "draft-only", self.draft, self.dev_idx)
        self.floor_test = self._point("draft-only", "draft-only", self.draft, self.test_idx)
        self.target_point_test = self._point("target-only", "target-only", self.target, self.test_idx)

    def _point(self, family: str, config: str, records: Sequence[RunRecord], idx: Sequence[int]) -> Point:
        return self.make_point(family, config, "test" if idx is self.test_idx else "dev",
                               [records[i] for i in idx], [self.target[i] for i in idx], [self.draft[i] for i in idx])

    def _scores(self, records: Sequence[RunRecord]) -> np.ndarray:
        return np.array([records[i].correct for i in self.test_idx], dtype=np.float64)

    def _times(self, records: Sequence[RunRecord], price: str) -> np.ndarray | None:
        """[n_test] modelled ms per test problem (``PassCosts.ttft_ms`` or ``record_ms``), None without costs."""
        if self.costs is None:
            return None
        return np.array([getattr(self.costs, price)(records[i]) for i in self.test_idx], dtype=np.float64)

    def _ratio_ci(self, num: np.ndarray | None, den: np.ndarray | None) -> tuple[float, float]:
        """The bootstrap interval of mean(num) / mean(den) over the test problems (paired resamples)."""
        if num is None or den is None:
            return (math.nan, math.nan)
        b = self.boot
        with np.errstate(divide="ignore", invalid="ignore"):
            return percentile_ci(num[b].mean(axis=1) / den[b].mean(axis=1))
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
        return Selection(family, axis, budget, config, dev, *self._on_test(family, config, records))

    def _on_test(self, family: str, config: str, records: Sequence[RunRecord]) -> tuple:
        """A configuration's test figures (memoised: the report and the plot select the same ones many times):
        (point, quality interval, gap, gap interval, per-problem scores, ttft interval, latency interval)."""
        key = (family, config)
        if key in self._tested:
            return self._tested[key]
        test = self._point(family, config, records, self.test_idx)
        correct = self._scores(records)
        b = self.boot
        q_draft, q_target = self.draft_test.mean(), self.target_test.mean()
        qc = resample_means(correct, b)  # replay estimates drawn as outcomes (``paired.resample_means``)
        quality_ci = percentile_ci(qc)
        if math.isclose(q_draft, q_target):
            gap, gap_ci = None, None
        else:
            qd, qt = self.draft_test[b].mean(axis=1), self.target_test[b].mean(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                boot_gap = np.where(np.isclose(qt, qd), np.nan, (qc - qd) / (qt - qd))
            gap, gap_ci = gap_recovered(test.quality, q_draft, q_target), percentile_ci(boot_gap)
        ttft_ci = self._ratio_ci(self._times(records, "ttft_ms"), self.draft_ttft_test)
        latency_ci = self._ratio_ci(self._times(records, "record_ms"), self.target_latency_test)
        self._tested[key] = (test, quality_ci, gap, gap_ci, correct, ttft_ci, latency_ci)
        return self._tested[key]

    def paired_difference(self, a: Selection, b: Selection) -> tuple[float, tuple[float, float]]:
        """Test quality of a minus b, and its paired bootstrap 95 % interval."""
        r = self.compare(a, b)
        return r.difference, r.ci

    def compare(self, a: Selection, b: Selection) -> PairedResult:
        """a minus b on the test problems: paired bootstrap interval and McNemar's exact test."""
        return compare(a.correct, b.correct, self.boot)

    def detectable(self) -> dict:
        """What this test split can detect: McNemar's floor and the difference detectable at 80 % power
        for the draft-vs-target discordance (the widest disagreement any cascade of this pair can have)."""
        n = len(self.test_idx)
        d = float(np.mean(np.abs(self.draft_test - self.target_test)))
        return {"n": n, "min_significant": min_significant_difference(n), "draft_target_discordance": d,
                "detectable_80": detectable_difference(n, d) if d > 0 else math.nan}

    def reference_ci(self, scores: np.ndarray) -> tuple[float, float]:
        return percentile_ci(scores[self.boot].mean(axis=1))


def pct(x: float | None) -> str:
    return "undefined" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def ci(pair: tuple[float, float] | None) -> str:
    if pair is None or any(math.isnan(v) for v in pair):
        return ""
    return f" [{100 * pair[0]:.0f}, {100 * pair[1]:.0f}]"


def _answer_notes(fr: Frontier) -> list[str]:
    """Answers with nothing to score, per baseline: no runnable code, no final answer, no \\boxed{} answer."""
    n_all = len(fr.draft)
    notes = []
    for label, test in (("with no runnable code (prose, or empty; scored as failures)", lambda r: r.score_detail == NO_CODE),
                        ("with no extractable final answer (scored as failures)", lambda r: r.score_detail == NO_ANSWER),
                        ("with no \\boxed{} answer (the answer was read from the text's last expression)",
                         lambda r: r.score_detail.startswith(NO_BOX))):
        counts = {name: sum(1 for r in recs if test(r)) for name, recs in (("draft-only", fr.draft), ("target-only", fr.target))}
        if any(counts.values()):
            notes.append(f"Answers {label}: " + ", ".join(f"{name} {k} of {n_all}" for name, k in counts.items()) + ".")
    return notes


def _times(x: float, ci: tuple[float, float]) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.2f}x" + ("" if math.isnan(ci[0]) else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def _estimated(s: Selection) -> str:
    share = s.test.exact_share
    return "" if share is None or share >= 1.0 else f" · {100 * (1 - share):.0f} % estimated"


def _p(r: PairedResult) -> str:
    return "" if r.p_value is None else f", p = {r.p_value:.3f}"


def significance_lines(fr: Frontier, selections: Sequence[Selection], budget: float) -> list[str]:
    """Per budget: the best policy's lead over each other, every token-level family against the request-level
    router, and every other significant pairwise lead (all paired on the test problems)."""
    sel = [s for s in selections if s.family not in REFERENCES]  # the oracle is a bound, not a policy
    if not sel:
        return []
    best = max(sel, key=lambda s: s.test.quality)
    notes = []
    for s in sel:
        if s is best:
            continue
        r = fr.compare(best, s)
        notes.append(f"{s.family} {100 * r.difference:+.1f} pp [{100 * r.ci[0]:+.1f}, {100 * r.ci[1]:+.1f}]{_p(r)} "
                     f"{'significant' if r.significant else 'not significant'}")
    lines = [f"- at {budget:g}: best test quality **{best.family}** ({pct(best.test.quality)}); its lead over "
             + ("; ".join(notes) if notes else "no other policy")]
    router = next((s for s in sel if s.family == REQUEST_BASELINE), None)
    if router is not None:
        vs = []
        for s in sel:
            if s.family in (REQUEST_BASELINE, "quantile-spec"):
                continue
            r = fr.compare(s, router)
            vs.append(f"{s.family} {100 * r.difference:+.1f} pp [{100 * r.ci[0]:+.1f}, {100 * r.ci[1]:+.1f}]"
                      f"{_p(r)}{' **significant**' if r.significant else ''}")
        if vs:
            lines.append(f"  - each family minus `{REQUEST_BASELINE}`: " + "; ".join(vs))
    pairs = []
    for i, a in enumerate(sel):
        for b in sel[i + 1:]:
            r = fr.compare(a, b)
            if r.significant:
                hi_, lo_ = (a, b) if r.difference > 0 else (b, a)
                pairs.append(f"{hi_.family} > {lo_.family} ({100 * abs(r.difference):.1f} pp)")
    lines.append("  - significant pairwise leads: " + (", ".join(pairs) if pairs else "none"))
    return lines


def summary_markdown(fr: Frontier, families: Sequence[str], axes: Sequence[str] = ("target_fraction", "passes_per_token"),
                     budgets: Sequence[float] = BUDGETS) -> str:
    """One table per dataset: each family's test quality [95 % interval] at each budget of the two main cost
    axes, its lead over ``quantile`` marked where significant (* paired, p < 0.05 and interval excluding 0),
    and its modelled time to first token ÷ draft-only's at each axis's middle budget."""
    mid = budgets[len(budgets) // 2]
    head = [f"{int(100 * b)} % {'FLOPs' if a == 'target_fraction' else 'passes'}" for a in axes for b in budgets]
    lines = [f"#### {fr.dataset}: summary (test n = {len(fr.test_idx)}; draft-only {pct(fr.draft_test.mean())}, "
             f"target-only {pct(fr.target_test.mean())})", "",
             "Test quality of each family's dev choice [95 % interval]; `+` / `-` after a figure: significantly above / "
             f"below `{REQUEST_BASELINE}` at that budget (paired); `~` before it: over 10 % of its test figures are "
             f"replay estimates; TTFT: modelled time to first token ÷ draft-only's at {int(100 * mid)} %.", "",
             "| policy | " + " | ".join(head) + " | " + " | ".join(f"TTFT @ {int(100 * mid)} % {'FLOPs' if a == 'target_fraction' else 'passes'}" for a in axes) + " |",
             "|" + "---|" * (1 + len(head) + len(axes))]
    for fam in families:
        if fam not in fr.runs or fam in REFERENCES:
            continue
        cells, ttfts = [], []
        for axis in axes:
            for b in budgets:
                s = fr.select(fam, axis, b)
                mark = ""
                if fam != REQUEST_BASELINE and REQUEST_BASELINE in fr.runs:
                    r = fr.compare(s, fr.select(REQUEST_BASELINE, axis, b))
                    mark = ("+" if r.difference > 0 else "-") if r.significant else ""
                est = "" if s.test.exact_share is None or s.test.exact_share >= 0.9 else "~"
                cells.append(f"{est}{pct(s.test.quality)}{ci(s.quality_ci)}{mark}")
            s = fr.select(fam, axis, mid)
            ttfts.append(_times(s.test.ttft, s.ttft_ci))
        lines.append(f"| {fam} | " + " | ".join(cells) + " | " + " | ".join(ttfts) + " |")
    return "\n".join(lines) + "\n"


def frontier_markdown(fr: Frontier, families: Sequence[str], axes: Sequence[str] = tuple(AXES)) -> tuple[str, list[Selection]]:
    """The dataset's report section: references with intervals and what the split can detect, then per
    axis a table of each family's dev choice at each budget on the test split (quality with its interval,
    cost, modelled time to first token ÷ draft-only's, latency ÷ target-only's) and which leads are
    significant. Returns the Markdown and every selection."""
    qd, qt = fr.draft_test.mean(), fr.target_test.mean()
    n_test, n_dev = len(fr.test_idx), len(fr.dev_idx)
    det = fr.detectable()
    lines = [f"### {fr.dataset}: test split (n = {n_test}; parameters chosen on the dev split, n = {n_dev})", "",
             f"draft-only {pct(qd)}{ci(fr.reference_ci(fr.draft_test))} · target-only {pct(qt)}"
             f"{ci(fr.reference_ci(fr.target_test))} (95 % bootstrap intervals)", "",
             f"What this split can detect: McNemar's exact test calls no difference under "
             f"{100 * det['min_significant']:.1f} pp significant (6 of {n_test} problems, all one way); draft-only "
             f"and target-only disagree on {100 * det['draft_target_discordance']:.1f} % of the test problems, and at "
             f"that discordance a difference of {pct(det['detectable_80'])} is detected with 80 % power (a pair of "
             "policies that disagree less can detect less). ", ""]
    lines += [line for note in _answer_notes(fr) for line in (note, "")]
    if math.isclose(qd, qt):
        lines += ["**Draft-only and target-only score the same on this test split: the gap recovered is undefined, "
                  "so no gap is reported; read the quality columns.**", ""]
    selections: list[Selection] = []
    for axis in axes:
        budgets = AXIS_BUDGETS[axis]
        lines += [f"#### budget on {AXES[axis]} (`{axis}`)", "",
                  "Cells: test quality [95 % interval] · gap recovered · cost on this axis · modelled time to first "
                  "token ÷ draft-only's · modelled latency ÷ target-only's · where some test problems' figures are "
                  "replay estimates (the replayed run left both recorded answers), their share.", "",
                  "| policy | " + " | ".join(f"@ {b:g}" for b in budgets) + " | configs (dev choice) |",
                  "|" + "---|" * (len(budgets) + 2)]
        by_budget: dict[float, list[Selection]] = {b: [] for b in budgets}
        for fam in families:
            if fam not in fr.runs:
                continue
            row = [fr.select(fam, axis, b) for b in budgets]
            for b, s in zip(budgets, row):
                by_budget[b].append(s)
            selections += row
            cells = [f"{pct(s.test.quality)}{ci(s.quality_ci)} · gap {pct(s.gap)} · cost {getattr(s.test, axis):.3f} · "
                     f"ttft {_times(s.test.ttft, s.ttft_ci)} · lat {_times(s.test.modelled_time, s.latency_ci)}"
                     f"{_estimated(s)}" for s in row]
            configs = " · ".join(f"`{s.config}`" for s in row)
            lines.append(f"| {fam} | " + " | ".join(cells) + f" | {configs} |")
        lines.append("")
        for b in budgets:
            lines += significance_lines(fr, by_budget[b], b)
        lines.append("")
    return "\n".join(lines) + "\n", selections
