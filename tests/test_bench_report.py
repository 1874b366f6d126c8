"""Report arithmetic (gap recovered, budgets, AUC, Pareto front), the derived request-level points and
calibration on a synthetic set, where the right answers are known by hand."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from cascade.bench.calibrate import choose_config, sweep_points
from cascade.bench.paths import PathStats
from cascade.bench.plot import plot_frontier
from cascade.bench.report import Point, aggregate, auc, best_within, gap_recovered, pareto, write_csv
from cascade.bench.runs import RunRecord
from cascade.policies import parse_policy
from cascade.bench.sweeps import draft_logprob_quantile, oracle_records, quantile_records, quantile_taus


def P(q, f, cost=None, family="x", config=None):
    return Point(dataset="d", family=family, config=config or f"{family}({q},{f})", source="replay", n=10,
                 quality=q, target_fraction=f, relative_cost=f if cost is None else cost)


def test_gap_recovered_and_budgets():
    assert gap_recovered(0.5, 0.4, 0.6) == pytest.approx(0.5)
    assert math.isnan(gap_recovered(0.5, 0.5, 0.5))
    floor = P(0.4, 0.0, family="draft-only")
    pts = [P(0.45, 0.05), P(0.5, 0.15), P(0.48, 0.25), P(0.58, 0.45), P(0.6, 1.1)]
    assert best_within(pts, 0.1, floor).quality == 0.45
    assert best_within(pts, 0.3, floor).quality == 0.5  # the 0.48 point costs more and is worse
    assert best_within(pts, 0.01, floor) is floor
    # AUC of the step function on 0, 0.01, ..., 1: gap 0 below 0.05, 0.25 to 0.15, 0.5 to 0.45, 0.9 after
    expected = (5 * 0 + 10 * 0.25 + 30 * 0.5 + 56 * 0.9) / 101
    assert auc(pts, floor, 0.4, 0.6) == pytest.approx(expected)


def test_pareto_front():
    pts = [P(0.5, 0.2, cost=0.2), P(0.4, 0.3, cost=0.3), P(0.6, 0.5, cost=0.5), P(0.55, 0.6, cost=0.6)]
    assert [p.quality for p in pareto(pts)] == [0.5, 0.6]


def test_choose_config_meets_the_budget_and_names_it():
    pts = [P(0.45, 0.05), P(0.5, 0.15), P(0.58, 0.45)]
    assert choose_config(pts, 0.2).quality == 0.5
    with pytest.raises(ValueError, match="budget"):
        choose_config(pts, 0.01)
    with pytest.raises(ValueError, match="budget"):
        choose_config(pts, -1)


def _rec(i, correct, emitted, target_tokens, draft_tokens, policy):
    return RunRecord(dataset="d", problem_id=str(i), policy=policy, correct=correct, emitted_tokens=emitted,
                     prompt_tokens=10, draft_tokens=draft_tokens, draft_prefill_tokens=10,
                     target_tokens=target_tokens, target_prefill_tokens=10 if target_tokens else 0, escalations=0)


def _synthetic(n, seed):
    """Problems whose draft answers have a hard stretch with probability 0.3; the draft is wrong exactly when
    its answer has an unconfident position the target disagrees with."""
    rng = random.Random(seed)
    problems, draft, target, dpaths, tpaths = [], [], [], [], []
    for i in range(n):
        L = rng.randint(20, 40)
        q = [rng.uniform(0.9, 1.0) for _ in range(L)]
        agree = [True] * L
        hard = rng.random() < 0.3
        if hard:
            j = rng.randrange(L)
            q[j], agree[j] = rng.uniform(0.2, 0.6), False
        mk = lambda toks: PathStats(tokens=toks, emitted=L, prompt_tokens=10, q_argmax=[1] * L, q_max=q,  # noqa: E731
                                    q_margin=q, q_entropy=[0.1] * L, p_argmax=[1 if a else 2 for a in agree],
                                    p_max=[0.95] * L, tv=[0.0 if a else 0.5 for a in agree],
                                    logp_x=[-0.05 if a else -2.0 for a in agree])
        dpaths.append(mk([1] * L))
        tpaths.append(mk([1 if a else 2 for a in agree]))
        problems.append(SimpleNamespace(dataset="syn", problem_id=str(i)))
        draft.append(_rec(i, 0.0 if hard else 1.0, L, 0, L, "draft-only"))
        target.append(_rec(i, 1.0, L, L, 0, "target-only"))
    return problems, draft, target, dpaths, tpaths


@pytest.mark.parametrize("family", ["chow", "chow-cut", "quantile"])
@pytest.mark.parametrize("budget", [0.1, 0.2, 0.3])
def test_calibration_meets_its_budget_on_a_synthetic_set(family, budget):
    dev = _synthetic(80, seed=1)
    pts = sweep_points(family, "syn", *dev, draft_params=1, target_params=3)
    chosen = choose_config(pts, budget)
    assert chosen.target_fraction <= budget + 1e-9
    assert chosen.quality == max(p.quality for p in pts if p.target_fraction <= budget + 1e-9)
    # the same configuration on a disjoint test set drawn from the same distribution stays near the budget
    test = _synthetic(200, seed=2)
    if family == "quantile":  # its thresholds are data-dependent: apply the chosen one to the test set
        pol = parse_policy(chosen.config)
        level, tau = pol.quantile, pol.tau
        _, draft, target, dpaths, _ = test
        test_fraction = aggregate("syn", "quantile", "c", "derived", quantile_records(draft, target, dpaths, level, tau, "c"),
                                  target, 1, 3).target_fraction
    else:
        test_pts = {p.config: p for p in sweep_points(family, "syn", *test, draft_params=1, target_params=3)}
        test_fraction = test_pts[chosen.config].target_fraction
    assert test_fraction <= budget + 0.08


def test_quantile_and_oracle_are_derived_exactly():
    problems, draft, target, dpaths, tpaths = _synthetic(50, seed=3)
    level = 0.0  # the minimum token log-prob: exactly the hard answers fall below log(0.7)
    recs = quantile_records(draft, target, dpaths, level, math.log(0.7), "quantile")
    hard = [d.correct == 0.0 for d in draft]
    assert [r.correct for r in recs] == [1.0] * 50
    assert [r.target_tokens > 0 for r in recs] == hard
    assert all(r.draft_tokens == d.draft_tokens for r, d in zip(recs, draft))  # the discarded draft work still counts
    assert draft_logprob_quantile(dpaths[0], 0.0) == pytest.approx(math.log(min(dpaths[0].q_max)))
    taus = quantile_taus(dpaths, level)
    assert taus[0] == -math.inf and taus[-1] == math.inf and taus == sorted(taus)
    assert recs == quantile_records(draft, target, dpaths, level, math.log(0.7), "quantile")
    oracle = oracle_records(draft, target)
    assert [o.target_tokens > 0 for o in oracle] == hard and all(o.correct == 1.0 for o in oracle)


def test_outputs_are_written(tmp_path):
    from test_bench_frontier import make_frontier

    fams = {"chow": [P(0.45, 0.05, family="chow"), P(0.55, 0.3, family="chow")]}
    write_csv(fams["chow"], tmp_path / "b.csv")
    plot_frontier({"d": make_frontier()}, ["a"], tmp_path / "b.png", "t")
    assert (tmp_path / "b.csv").read_text().count("\n") == 3
    assert (tmp_path / "b.png").stat().st_size > 10_000


@pytest.mark.parametrize("budget", [0.1, 0.2])
def test_bild_calibrates_on_the_passes_axis(budget):
    """BiLD verifies every token it keeps (the target checks every k tokens), so on target FLOPs it is never
    cheap; on target passes per token (the memory-bound regime it was designed for) it is."""
    dev = _synthetic(80, seed=1)
    pts = sweep_points("bild", "syn", *dev, draft_params=1, target_params=3)
    assert min(p.target_fraction for p in pts) > 0.5
    chosen = choose_config(pts, budget, "passes_per_token")
    assert chosen.passes_per_token <= budget + 1e-9 and chosen.quality > 0.7 + 1e-9


def _pt(ds, config, quality, cost):
    return Point(dataset=ds, family="f", config=config, source="replay-dev", n=10, quality=quality,
                 target_fraction=cost, scored_fraction=cost, relative_cost=cost, passes_per_token=cost,
                 modelled_time=cost, tokens_per_s=None, exact_share=1.0)


def test_pooled_choice_fits_every_dataset_and_weighs_each_dataset_once():
    from cascade.bench.calibrate import pooled_choice

    floors = {"a": (0.4, 0.6), "b": (0.2, 0.8)}
    per_family = {
        # x: best on a (gap 1.0) but over budget on b; y: gaps 0.5 / 0.5; z: gaps 0.0 / 0.9 (mean 0.45)
        "f": {"a": [_pt("a", "x", 0.6, 0.1), _pt("a", "y", 0.5, 0.2)], "b": [_pt("b", "x", 0.8, 0.5), _pt("b", "y", 0.5, 0.2)]},
        "g": {"a": [_pt("a", "z", 0.4, 0.1)], "b": [_pt("b", "z", 0.74, 0.1)]},
    }
    assert pooled_choice(per_family, floors, 0.2, "target_fraction") == ("f", "y")
    assert pooled_choice(per_family, floors, 0.1, "target_fraction") == ("g", "z")
    with pytest.raises(ValueError, match="budget"):
        pooled_choice(per_family, floors, 0.05, "target_fraction")


def test_pooled_choice_meets_every_further_limit_on_every_dataset():
    """The shipped default's criterion: within the FLOPs budget AND within the time-to-first-token limit (and a
    point without a modelled figure fits no limit)."""
    import dataclasses

    from cascade.bench.calibrate import pooled_choice

    floors = {"a": (0.4, 0.6), "b": (0.2, 0.8)}
    with_ttft = lambda p, t: dataclasses.replace(p, ttft=t)  # noqa: E731
    per_family = {
        # y: the best gap, but a router's first token (8x draft-only's) on b; x: streams everywhere
        "f": {"a": [with_ttft(_pt("a", "x", 0.5, 0.1), 1.1), with_ttft(_pt("a", "y", 0.6, 0.2), 1.2)],
              "b": [with_ttft(_pt("b", "x", 0.5, 0.2), 1.3), with_ttft(_pt("b", "y", 0.8, 0.2), 8.0)]},
        "g": {"a": [_pt("a", "z", 0.6, 0.1)], "b": [_pt("b", "z", 0.8, 0.1)]},  # no modelled ttft (NaN)
    }
    assert pooled_choice(per_family, floors, 0.2, "target_fraction") == ("g", "z")
    assert pooled_choice(per_family, floors, 0.2, "target_fraction", {"ttft": 1.5}) == ("f", "x")
    with pytest.raises(ValueError, match="ttft <= 1.05"):
        pooled_choice(per_family, floors, 0.2, "target_fraction", {"ttft": 1.05})


def test_quantile_pooled_over_two_datasets_is_one_policy_string_on_both():
    """quantile's tau grid is data-dependent: with each dataset's own grid the same grid index is a different
    threshold per dataset and no single policy string is ever deployable. The pooled grid makes them one."""
    from cascade.bench.calibrate import pooled_choice

    a, b = _synthetic(40, seed=5), _synthetic(40, seed=6)
    pooled = list(a[3]) + list(b[3])
    per_family = {"quantile": {name: sweep_points("quantile", name, *ds, draft_params=1, target_params=3, tau_paths=pooled)
                               for name, ds in (("a", a), ("b", b))}}
    assert [p.config for p in per_family["quantile"]["a"]] == [p.config for p in per_family["quantile"]["b"]]
    floors = {name: (sum(r.correct for r in ds[1]) / 40, 1.0) for name, ds in (("a", a), ("b", b))}
    family, config = pooled_choice(per_family, floors, 0.5, "target_fraction")
    assert family == "quantile" and all(any(p.config == config for p in col) for col in per_family["quantile"].values())
    # per-dataset grids share no threshold, and the choice then compares only configurations both datasets have
    own = {"quantile": {name: sweep_points("quantile", name, *ds, draft_params=1, target_params=3)
                        for name, ds in (("a", a), ("b", b))}}
    shared = {p.config for p in own["quantile"]["a"]} & {p.config for p in own["quantile"]["b"]}
    assert pooled_choice(own, floors, 1.0, "target_fraction")[1] in shared


def test_the_shipped_default_policy_parses_and_says_what_it_was_measured_on():
    from cascade.defaults import default_calibration, default_policy

    cal = default_calibration()
    policy = parse_policy(default_policy())
    if cal is None:  # a checkout without the shipped file falls back to lossless speculative decoding
        assert policy.name == "speculative"
    else:
        assert policy.describe() == parse_policy(cal["policy"]).describe()
        assert cal["budget"] >= 0 and cal["datasets"] and all("dev" in d for d in cal["datasets"])


def test_a_default_that_needs_a_router_falls_back_without_one(tiny_pair_dirs, monkeypatch):
    """The shipped default may be ``learned``; a pair loaded without a router runs lossless speculative
    instead of failing every request that names no policy."""
    import cascade.defaults as defaults
    from test_engine import make_cascade

    monkeypatch.setattr(defaults, "default_calibration", lambda: {"policy": "learned(threshold=0.5)"})
    assert defaults.default_policy(router_loaded=True) == "learned(threshold=0.5)"
    assert defaults.default_policy(router_loaded=False) == "speculative"
    assert defaults.default_policy(router_loaded=True, default_pair=False) == "speculative"  # another pair's thresholds
    c = make_cascade(tiny_pair_dirs, max_rows=2)
    assert not c.default_pair and c.default_policy() == "speculative"
    c.default_pair = True  # as if it were the pair the default was calibrated on: the router is what is missing
    assert c.engine.router is None and c.default_policy() == "speculative"
    [r] = c.generate([[1, 2, 3]], None)
    assert r.policy.startswith("speculative")


def test_target_flops_count_the_prompt_prefill_of_every_request_the_target_touches():
    """Ten requests of a 100-token prompt and a 20-token answer. A token-level policy that escalates one
    block (6 positions, no catch-up) in each of them processes 60 generated positions, 0.25 of target-only's
    200 generated ones, but it also makes the target prefill all ten prompts: 1060 of target-only's 1200
    positions. A router that sends two whole requests to the target costs 240 of 1200."""
    def rec(i, target_tokens, prefill, policy):
        return RunRecord(dataset="d", problem_id=str(i), policy=policy, correct=1.0, emitted_tokens=20,
                         prompt_tokens=100, draft_tokens=20, draft_prefill_tokens=100, target_tokens=target_tokens,
                         target_prefill_tokens=prefill, escalations=1 if target_tokens else 0)

    target = [rec(i, 20, 100, "target-only") for i in range(10)]
    token_level = [rec(i, 6, 100, "t") for i in range(10)]
    router = [rec(i, 20, 100, "r") if i < 2 else rec(i, 0, 0, "r") for i in range(10)]
    assert aggregate("d", "target-only", "c", "real", target, target, 1, 3).target_fraction == 1.0
    assert aggregate("d", "t", "c", "replay", token_level, target, 1, 3).target_fraction == pytest.approx(1060 / 1200)
    assert aggregate("d", "r", "c", "derived", router, target, 1, 3).target_fraction == pytest.approx(240 / 1200)
    # the positions that decided a token stay per emitted token and leave the prompt out
    assert aggregate("d", "t", "c", "replay", token_level, target, 1, 3).scored_fraction == pytest.approx(60 / 200)


def test_a_calibration_summary_states_its_further_limits():
    from cascade.bench.calibrate import Calibration

    cal = Calibration(policy="takeover(k=5)", family="takeover", budget=0.2, axis="target_fraction", per_dataset=[],
                      candidates=3, limits={"ttft": 1.5, "modelled_time": 1.0})
    out = cal.summary()
    assert out["limits"] == {"ttft": 1.5, "modelled_time": 1.0}
    assert "ttft <= 1.5, modelled_time <= 1" in out["chosen_on"]
    assert "limits" not in Calibration(policy="chow(k=5)", family="chow", budget=0.2, axis="target_fraction",
                                       per_dataset=[], candidates=1).summary()


def test_the_stock_remote_axis_prices_every_pass_as_its_whole_sequence():
    """A stock OpenAI route recomputes the whole sequence on each pass: two escalations of a 10-token prompt
    ending at answer lengths 4 and 9 cost (10 + 4) + (10 + 9) positions there; target-only's one generate
    call costs prompt + answer. Records written before the counter: derived for target-alone steps, else NaN."""
    def rec(policy, **kw):
        base = dict(dataset="d", problem_id="p", policy=policy, correct=1.0, emitted_tokens=10, prompt_tokens=10,
                    draft_tokens=0, draft_prefill_tokens=0, target_tokens=0, target_prefill_tokens=0, escalations=0)
        return RunRecord(**{**base, **kw})

    target = rec("target-only", target_tokens=9, target_prefill_tokens=10, target_passes=10)
    assert target.stateless == 10 * 10 + 45  # pass i ends at prompt + i, derived
    draft = rec("draft-only", draft_tokens=9, draft_prefill_tokens=10)
    assert draft.stateless == 0
    cascade = rec("chow", target_tokens=9, target_prefill_tokens=10, escalations=2, target_passes=2,
                  target_stateless_tokens=(10 + 4) + (10 + 9))
    p = aggregate("d", "chow", "chow", "replay", [cascade], [target], 1, 1)
    assert p.stock_remote_fraction == pytest.approx(33 / 19) and p.target_fraction == pytest.approx(1.0)
    old = rec("chow", target_tokens=9, target_prefill_tokens=10, escalations=2, target_passes=2)
    assert old.stateless is None
    assert math.isnan(aggregate("d", "chow", "chow", "real", [old], [target], 1, 1).stock_remote_fraction)
