"""Calibration: pick the parameter of a policy that meets a target-token budget on a dev split, then
report what it really does on a disjoint test split.

``choose_config`` is the rule, on points (one per configuration): the highest quality among those whose
``target_token_fraction`` is within the budget, ties to the cheaper. ``sweep_points`` builds those points
by replay from recorded answers (no model needed, so the rule is testable on synthetic statistics);
``calibrate`` runs the whole procedure on the real pair, over one or several datasets and one or several
policy families: dev baselines + replay sweeps → one choice for all datasets (``pooled_choice``) → real runs
of the choice and both baselines on the test splits. The chosen policy string goes straight to
``cascade generate --policy`` (and the server's ``--policy``); written with ``--ship`` it becomes the
project's default policy (``cascade.defaults``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cascade.bench.paths import PathStats, score_paths
from cascade.bench.report import Point, aggregate, gap_recovered
from cascade.bench.runs import RunRecord
from cascade.bench.sweeps import REQUEST_LEVEL, grid_policies, sweep_records
from cascade.machine import machine_info


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
                 target_params: int, costs=None, tau_paths: Sequence[PathStats] | None = None,
                 on_config=lambda: None) -> list[Point]:
    """One replayed (token-level) or derived (request-level) point per grid configuration, the same
    records ``cascade bench`` sweeps (``sweeps.sweep_records``). ``tau_paths``: the draft paths whose score
    quantiles give ``quantile``'s tau grid (default ``dpaths``); pass every dataset's dev paths when one
    choice must serve several datasets, so that each grid point is the same policy string on all of them.
    ``on_config``: called after each replayed configuration (progress)."""
    runs = sweep_records([family], problems, draft, target, dpaths, tpaths,
                         dpaths if tau_paths is None else tau_paths, on_config)[family]
    source = "derived" if family in REQUEST_LEVEL else "replay"
    return [aggregate(dataset, family, config, source, recs, target, draft_params, target_params, costs, draft)
            for config, recs in runs]


@dataclass
class DatasetCalibration:
    """The chosen configuration on one dataset: replayed on its dev split, run for real on its test split."""

    dataset: str
    dev: Point
    dev_draft: Point
    dev_target: Point
    test: Point  # the choice on the test split: real runs, or replayed when test_limit = 0 (``source`` says)
    test_draft: Point | None
    test_target: Point | None

    def summary(self, axis: str) -> dict:
        out = {"dataset": self.dataset,
               "dev": {"n": self.dev.n, "quality": self.dev.quality, "cost": getattr(self.dev, axis),
                       "target_fraction": self.dev.target_fraction, "passes_per_token": self.dev.passes_per_token,
                       "ttft_vs_draft_only": self.dev.ttft, "modelled_ttft_ms": self.dev.ttft_ms,
                       "modelled_latency_ms": self.dev.latency_ms, "source": self.dev.source,
                       "draft_only_quality": self.dev_draft.quality, "target_only_quality": self.dev_target.quality,
                       "gap_recovered": gap_recovered(self.dev.quality, self.dev_draft.quality, self.dev_target.quality)}}
        if self.test is not None:
            out["test"] = {"source": self.test.source, "n": self.test.n, "quality": self.test.quality, "cost": getattr(self.test, axis),
                           "target_fraction": self.test.target_fraction, "relative_cost": self.test.relative_cost,
                           "passes_per_token": self.test.passes_per_token, "ttft_vs_draft_only": self.test.ttft,
                           "modelled_ttft_ms": self.test.ttft_ms, "measured_ttft_s": self.test.ttft_s,
                           "measured_latency_s": self.test.latency_s, "tokens_per_s": self.test.tokens_per_s,
                           "gap_recovered": gap_recovered(self.test.quality, self.test_draft.quality, self.test_target.quality),
                           "draft_only_quality": self.test_draft.quality, "target_only_quality": self.test_target.quality,
                           "draft_only_tokens_per_s": self.test_draft.tokens_per_s,
                           "target_only_tokens_per_s": self.test_target.tokens_per_s}
        return out


@dataclass
class Calibration:
    policy: str  # the chosen configuration, a policy string for --policy
    family: str
    budget: float
    axis: str  # the budget's cost axis (cascade.bench.frontier.AXES)
    per_dataset: list[DatasetCalibration]
    candidates: int  # configurations compared on the dev splits
    machine: dict | None = None  # where the real runs ran (``cascade.machine.machine_info``)
    imported_timings: Sequence[str] = ()  # machines that timed records read from an imported cache
    limits: dict[str, float] | None = None  # further axis limits every dataset's dev point met (``pooled_choice``)

    def summary(self) -> dict:
        """The JSON ``cascade calibrate`` writes (and ``cascade serve --calibration`` / the shipped default
        read: the key every reader needs is ``policy``)."""
        within = "".join(f", {name} <= {bound:g}" for name, bound in (self.limits or {}).items())
        out = {"policy": self.policy, "family": self.family, "budget": self.budget, "axis": self.axis,
               "chosen_on": f"dev splits (every dataset's cost within the budget{within}; the highest mean dev gap recovered)",
               "candidates": self.candidates, "datasets": [d.summary(self.axis) for d in self.per_dataset]}
        if self.limits:
            out["limits"] = dict(self.limits)
        if self.machine is not None:
            out["machine"] = self.machine
        if self.imported_timings:  # tokens/s of those records are the other machine's, quality and cost are the pair's
            out["imported_timings"] = list(self.imported_timings)
        tested = [d for d in self.per_dataset if d.test is not None]
        if tested:
            out["meets_budget_on_test"] = all(getattr(d.test, self.axis) <= self.budget + 1e-9 for d in tested)
        if len(self.per_dataset) == 1:  # the single-dataset shape earlier versions wrote
            one = out["datasets"][0]
            out["dev"] = one["dev"]
            if "test" in one:
                out["test"] = one["test"]
        return out


def pooled_choice(per_family: dict[str, dict[str, list[Point]]], floors: dict[str, tuple[float, float]],
                  budget: float, axis: str, limits: dict[str, float] | None = None) -> tuple[str, str]:
    """(family, config) with every dataset's dev cost on ``axis`` within ``budget`` (and on each axis of
    ``limits`` within its limit: e.g. ``{"ttft": 1.5, "modelled_time": 1.0}``, modelled time to first token
    within 1.5x draft-only's and latency below target-only's) and the highest mean dev gap recovered over the
    datasets (each dataset counts once, whatever its size; a dataset whose draft and target score the same
    contributes its quality difference instead), ties to the cheaper. ``per_family``: family -> dataset -> one
    point per configuration; a configuration is compared only where every dataset has it (same policy
    string); ``floors``: dataset -> (draft-only, target-only) dev quality. ValueError naming ``budget`` if
    none fits."""
    bounds = {**(limits or {}), axis: budget}
    best, best_key = None, None
    for family, by_ds in per_family.items():
        columns = [{p.config: p for p in col} for col in by_ds.values()]
        for config in (p.config for p in next(iter(by_ds.values()))):
            if any(config not in col for col in columns):
                continue
            pts = [col[config] for col in columns]
            if any(not getattr(p, name) <= bound + 1e-9 for p in pts for name, bound in bounds.items()):
                continue  # (an axis the point lacks, NaN, fits no bound)
            gains = []
            for p in pts:
                qd, qt = floors[p.dataset]
                gains.append(p.quality - qd if abs(qt - qd) < 1e-12 else (p.quality - qd) / (qt - qd))
            key = (sum(gains) / len(gains), -max(getattr(p, axis) for p in pts))
            if best_key is None or key > best_key:
                best, best_key = (family, pts[0].config), key
    if best is None:
        extra = "".join(f", {name} <= {bound:g}" for name, bound in (limits or {}).items())
        raise ValueError(f"budget {budget:.3f}: no configuration of {', '.join(per_family)} fits on {axis}{extra} on every dataset")
    return best


def calibrate(bench, families: Sequence[str], budget: float, datasets: dict[str, list], dev_fraction: float = 0.5,
              seed: int = 0, axis: str = "target_fraction", test_limit: int | None = None,
              limits: dict[str, float] | None = None) -> Calibration:
    """Dev splits of every dataset: baselines + replay sweep of every family → one choice for all
    (``pooled_choice``, with the further axis ``limits``). Test splits: real runs of the choice and of both
    baselines on the first ``test_limit`` test problems of each dataset (None: all; 0: none)."""
    from cascade.bench.datasets import split

    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget!r}")
    per_family: dict[str, dict[str, list[Point]]] = {f: {} for f in families}
    floors, dev_refs, splits, dev_runs = {}, {}, {}, {}
    for ds, problems in datasets.items():
        dev, test = split(problems, dev_fraction, seed)
        splits[ds] = (dev, test)
        bench.say(f"[calibrate] {', '.join(families)} for budget {budget:.0%} ({axis}) on {ds}: dev {len(dev)}, test {len(test)} problems")
        d_draft = bench.run("draft-only", dev, f"{ds} dev draft-only")
        d_target = bench.run("target-only", dev, f"{ds} dev target-only")
        dpaths = bench.paths(dev, d_draft, "draft")
        tpaths = bench.paths(dev, d_target, "target")
        if getattr(bench, "router", None) is not None:  # learned reads the router's scores off the paths
            score_paths(bench.router, dpaths + tpaths)
        dev_runs[ds] = (dev, d_draft, d_target, dpaths, tpaths)
    # quantile's tau grid from every dataset's dev answers together: one threshold must serve them all
    pooled_dev_paths = [p for (_, _, _, dpaths, _) in dev_runs.values() for p in dpaths]
    from tqdm.auto import tqdm

    replayed = [f for f in families if f not in REQUEST_LEVEL]
    for ds, (dev, d_draft, d_target, dpaths, tpaths) in dev_runs.items():
        total = sum(len(grid_policies(f, pooled_dev_paths)) for f in replayed)
        bar = tqdm(total=total, desc=f"{ds} dev replay sweeps", unit="config", disable=not bench.cfg.progress)
        for fam in families:
            per_family[fam][ds] = sweep_points(fam, ds, dev, d_draft, d_target, dpaths, tpaths, bench.draft_params,
                                               bench.target_params, bench.costs, tau_paths=pooled_dev_paths,
                                               on_config=lambda: bar.update(1))
        bar.close()
        ref = lambda recs, name: aggregate(ds, name, name, "real", recs, d_target, bench.draft_params,  # noqa: E731
                                           bench.target_params, bench.costs, d_draft)
        dev_refs[ds] = (ref(d_draft, "draft-only"), ref(d_target, "target-only"))
        floors[ds] = (dev_refs[ds][0].quality, dev_refs[ds][1].quality)
    family, config = pooled_choice(per_family, floors, budget, axis, limits)
    bench.say(f"[calibrate] dev choice: {config}")
    out = []
    for ds, (dev, test) in splits.items():
        dev_pt = next(p for p in per_family[family][ds] if p.config == config)
        sub = test[:test_limit] if test_limit else test
        recs = {name: bench.run(name, sub, f"{ds} test {name}") for name in ("draft-only", "target-only")}
        if test_limit != 0:
            recs[config] = bench.run(config, sub, f"{ds} test {config}")
            source = "real"
        else:  # no real runs: the chosen configuration replayed on the test split (labelled so)
            tpaths = bench.paths(sub, recs["target-only"], "target")
            dpaths = bench.paths(sub, recs["draft-only"], "draft")
            recs[config] = sweep_one(family, config, sub, recs["draft-only"], recs["target-only"], dpaths, tpaths, bench)
            source = "replay-test"
        pt = lambda name, cfg, src: aggregate(ds, family, cfg, src, recs[name], recs["target-only"],  # noqa: E731
                                              bench.draft_params, bench.target_params, bench.costs, recs["draft-only"])
        t_real, t_draft, t_target = pt(config, config, source), pt("draft-only", "draft-only", "real"), pt("target-only", "target-only", "real")
        out.append(DatasetCalibration(ds, dev_pt, *dev_refs[ds], t_real, t_draft, t_target))
    candidates = sum(len(next(iter(by_ds.values()))) for by_ds in per_family.values())
    return Calibration(policy=config, family=family, budget=budget, axis=axis, per_dataset=out, candidates=candidates,
                       machine=machine_info(), imported_timings=sorted(bench.timed_on), limits=dict(limits or {}))


def sweep_one(family: str, config: str, problems, draft, target, dpaths, tpaths, bench) -> list[RunRecord]:
    """The records of one configuration of ``family`` on ``problems``: replayed (token-level) or derived
    (request-level: the policy string carries its tau, so no tau grid is needed)."""
    from cascade.bench.replay import replay_records
    from cascade.bench.sweeps import quantile_records
    from cascade.policies import parse_policy

    if getattr(bench, "router", None) is not None:
        score_paths(bench.router, list(dpaths) + list(tpaths))
    if family == "quantile":
        pol = parse_policy(config)
        return quantile_records(draft, target, dpaths, pol.quantile, pol.tau, config)
    if family in REQUEST_LEVEL:
        raise ValueError(f"{family}: replay of one configuration is not supported; run it with a test limit")
    pol = parse_policy(config)
    return replay_records(pol, problems, dpaths, tpaths, [d.correct for d in draft], [t.correct for t in target])


def write_calibration(cal: Calibration, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal.summary(), indent=1) + "\n")
