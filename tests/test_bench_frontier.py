"""The honest frontier on synthetic records whose answers are known by hand: parameters are chosen on the
dev split only, figures are the test split's, intervals contain the point estimate and shrink with n,
significance is paired, an undefined gap is said so, and the cost axes (passes, modelled time) count what
they claim."""

from __future__ import annotations

import math

import pytest

from cascade.bench.costs import PassCosts
from cascade.bench.frontier import Frontier, frontier_markdown
from cascade.bench.report import aggregate
from cascade.bench.runs import RunRecord
from cascade.bench.sweeps import quantile_taus

from test_bench_report import _synthetic


def rec(i, correct, target_tokens, passes, policy, emitted=10, prefill=0):
    return RunRecord(dataset="d", problem_id=str(i), policy=policy, correct=float(correct), emitted_tokens=emitted,
                     prompt_tokens=5, draft_tokens=0 if policy == "target-only" else emitted, draft_prefill_tokens=5,
                     target_tokens=target_tokens, target_prefill_tokens=prefill, escalations=passes,
                     target_passes=passes)  # by default no prefill charged: these records test selection, where
    #   target FLOPs are then target tokens / target-only's (the prefill's own test is in test_bench_report)


def make_frontier(n=40, seed=0):
    """Draft right on even problems, target right everywhere. Family "a": config "cheap" fixes half the odd
    problems of the DEV split at 10 % target tokens and none of the test split (an overfit config), "fair"
    fixes every odd problem at 20 % everywhere. Family "b" has "fair" alone."""
    dev_idx = [i for i in range(n) if (i // 2) % 2 == 0]
    test_idx = [i for i in range(n) if (i // 2) % 2 == 1]
    draft = [rec(i, i % 2 == 0, 0, 0, "draft-only") for i in range(n)]
    target = [rec(i, 1, 10, 11, "target-only") for i in range(n)]
    cheap = [rec(i, (i % 2 == 0) or i % 8 == 1, 1, 1, "cheap") for i in range(n)]
    fair = [rec(i, 1, 2, 1, "fair") for i in range(n)]
    runs = {"a": [("cheap", cheap), ("fair", fair)], "b": [("fair", fair)]}
    fr = Frontier("d", runs, draft, target, dev_idx, test_idx,
                  lambda fam, cfg, src, recs, tgt, drf: aggregate("d", fam, cfg, src, recs, tgt, 1, 3), reps=500, seed=seed)
    return fr


def test_selection_is_made_on_dev_and_reported_on_test():
    fr = make_frontier()
    s = fr.select("a", "target_fraction", 0.15)
    assert s.config == "cheap" and s.dev.quality == 0.75  # the dev split cannot tell it overfits ...
    assert s.test.quality == 0.5 and s.gap == pytest.approx(0.0)  # ... the test split can
    s = fr.select("a", "target_fraction", 0.25)
    assert s.config == "fair" and s.test.quality == 1.0 and s.gap == pytest.approx(1.0)
    assert fr.select("a", "target_fraction", 0.05).config == "draft-only"  # nothing fits: the draft alone
    lo, hi = s.quality_ci
    assert lo <= s.test.quality <= hi


def test_intervals_and_paired_significance():
    fr = make_frontier(n=200)
    cheap, fair = fr.select("a", "target_fraction", 0.15), fr.select("a", "target_fraction", 0.25)
    d, (lo, hi) = fr.paired_difference(fair, cheap)
    assert d == pytest.approx(0.5) and lo > 0  # significant
    d, (lo, hi) = fr.paired_difference(fair, fair)
    assert d == 0 and lo == hi == 0
    assert cheap.gap_ci == (0.0, 0.0)  # on test it is the draft itself, in every resample
    lo, hi = cheap.quality_ci
    assert lo < 0.5 < hi
    small = make_frontier(n=40).select("a", "target_fraction", 0.15).quality_ci
    assert (small[1] - small[0]) > (hi - lo)  # fewer test problems, wider interval


def test_passes_axis_and_markdown():
    fr = make_frontier()
    s = fr.select("a", "passes_per_token", 0.15)  # fair: 1 pass per 10 tokens
    assert s.test.passes_per_token == pytest.approx(0.1)
    md, sels = frontier_markdown(fr, ["a", "b"])
    assert "test split (n = 20" in md and "passes_per_token" in md and "significant" in md
    assert "What this split can detect" in md and "30.0 pp" in md  # McNemar's floor: 6 of 20 problems
    assert len(sels) == 6 * 3 * 2  # every axis (AXES) at its three budgets, two families


def test_undefined_gap_is_said_not_dashed():
    n = 20
    draft = [rec(i, i % 2, 0, 0, "draft-only") for i in range(n)]
    target = [rec(i, (i + 1) % 2, 10, 11, "target-only") for i in range(n)]  # same mean quality
    fr = Frontier("d", {"a": [("x", draft)]}, draft, target, list(range(0, n, 2)), list(range(1, n, 2)),
                  lambda fam, cfg, src, recs, tgt, drf: aggregate("d", fam, cfg, src, recs, tgt, 1, 3), reps=100)
    fr.target_test[:] = fr.draft_test  # force equal test means
    s = fr.select("a", "target_fraction", 0.2)
    assert s.gap is None and s.gap_ci is None
    md, _ = frontier_markdown(fr, ["a"])
    assert "undefined" in md


def test_modelled_time_from_runner_cost_figures(tmp_path):
    path = tmp_path / "rc.csv"
    rows = ["machine,model,device,dtype,linear_impl,decode,batch,context,op,tokens_per_row,ms_median"]
    for model, step, pos in (("0.5b", 10.0, 1.0), ("1.5b", 30.0, 2.0)):
        for n in (1, 2, 5):
            rows.append(f"m,{model},cpu,float32,onednn,eager,1,300,{'step' if n == 1 else 'span'},{n},{step + (n - 1) * pos}")
    path.write_text("\n".join(rows) + "\n")
    c = PassCosts.from_runner_cost_csv(path)
    assert (c.draft_step_ms, c.draft_position_ms, c.target_step_ms, c.target_position_ms) == pytest.approx((10, 1, 30, 2))
    r = rec(0, 1, target_tokens=12, passes=2, policy="x", prefill=5)  # 12 + 5 prompt positions in 2 passes, 10 draft steps
    assert c.record_ms(r) == pytest.approx(10 * 10 + 5 * 1 + 2 * 30 + 15 * 2)
    # a file of one other dtype (the llama.cpp runner's q4_k_m) is read without naming it
    gguf = tmp_path / "rc_gguf.csv"
    gguf.write_text(path.read_text().replace(",float32,onednn,", ",q4_k_m,llama.cpp,"))
    g = PassCosts.from_runner_cost_csv(gguf)
    assert (g.target_step_ms, g.target_position_ms) == pytest.approx((30, 2)) and "q4_k_m" in g.source
    with pytest.raises(ValueError, match="float32"):
        PassCosts.from_runner_cost_csv(gguf, dtype="float32")


def test_quantile_taus_have_the_common_resolution():
    _, _, _, dpaths, _ = _synthetic(300, seed=4)
    taus = quantile_taus(dpaths, 0.0)
    assert taus[0] == -math.inf and taus[-1] == math.inf and taus == sorted(taus)
    assert len(taus) <= 17 + 2  # not one per observed score (300 answers)


def test_quantile_spec_pays_the_draft_answer_plus_a_speculative_target_answer():
    """quantile routing in front of a speculative-decoding target: a routed request costs the draft's
    answer plus speculative's run on the target's answer (its passes, not one per token)."""
    from cascade.bench.replay import replay_record
    from cascade.bench.sweeps import quantile_records
    from cascade.policies import make_policy

    problems, draft, target, dpaths, tpaths = _synthetic(30, seed=5)
    for t in target:
        t.target_passes = t.emitted_tokens
    spec = make_policy("speculative")
    spec_on_target = [replay_record(spec, p, tp, None, t.correct, t.correct) for p, tp, t in zip(problems, tpaths, target)]
    plain = quantile_records(draft, target, dpaths, 0.0, math.log(0.7), "q")
    fast = quantile_records(draft, spec_on_target, dpaths, 0.0, math.log(0.7), "qs")
    routed = [i for i, r in enumerate(plain) if r.target_tokens > 0]
    assert routed and all(fast[i].correct == plain[i].correct for i in range(30))
    for i in routed:
        assert fast[i].passes < plain[i].passes  # a few verify passes instead of one per token
        assert fast[i].draft_tokens == draft[i].draft_tokens + spec_on_target[i].draft_tokens
    for i in set(range(30)) - set(routed):
        assert fast[i].target_tokens == 0 and fast[i].draft_tokens == draft[i].draft_tokens


def _costs():
    return PassCosts(draft_step_ms=10.0, draft_position_ms=1.0, target_step_ms=30.0, target_position_ms=2.0)


def test_ttft_of_a_request_level_policy_is_its_draft_answers_time():
    """quantile holds every token back until the draft's answer is scored: a kept answer's first token
    comes after the draft's whole answer, a routed one's after that and the target's first round."""
    from cascade.bench.sweeps import quantile_records

    _, draft, target, dpaths, _ = _synthetic(30, seed=3)
    costs = _costs()
    kept = quantile_records(draft, target, dpaths, 0.0, -math.inf, "keep")
    routed = quantile_records(draft, target, dpaths, 0.0, math.inf, "route")
    for d, t, k, r in zip(draft, target, kept, routed):
        assert costs.ttft_ms(k) == pytest.approx(costs.record_ms(d))
        first_round = costs.target_step_ms + (t.prompt_tokens - 1) * costs.target_position_ms  # the prompt, one pass
        assert costs.ttft_ms(r) == pytest.approx(costs.record_ms(d) + first_round)
        assert costs.ttft_ms(k) > costs.ttft_ms(d)  # draft-only streams its first block


def test_ttft_of_a_token_level_policy_is_its_first_round():
    """A token-level policy's first token comes with its first round: the draft's prompt and block, and
    the target's prompt and block when that round escalates."""
    from cascade.bench.replay import replay_record
    from cascade.policies import make_policy

    problems, draft, target, dpaths, tpaths = _synthetic(30, seed=4)
    costs = _costs()
    for pol in (make_policy("speculative", k=4), make_policy("chow", alpha=1.0, k=4)):  # always / never escalates
        for p, dp, tp, d, t in zip(problems, dpaths, tpaths, draft, target):
            r = replay_record(pol, p, dp, tp, d.correct, t.correct)
            draft_part = 3 * costs.draft_step_ms + dp.prompt_tokens * costs.draft_position_ms  # prompt, then k - 1 steps
            if pol.name == "speculative":  # one target pass over the prompt and the 4 drafted tokens
                expected = draft_part + costs.target_step_ms + (dp.prompt_tokens + 4 - 1) * costs.target_position_ms
            else:
                expected = draft_part
            assert costs.ttft_ms(r) == pytest.approx(expected)
            assert costs.ttft_ms(r) < costs.record_ms(r)


def test_frontier_reports_ttft_against_draft_only_with_intervals():
    problems, draft, target, dpaths, tpaths = _synthetic(40, seed=6)
    from cascade.bench.sweeps import sweep_records

    runs = sweep_records(["chow", "quantile"], problems, draft, target, dpaths, tpaths, dpaths)
    costs = _costs()
    fr = Frontier("syn", runs, draft, target, list(range(0, 40, 2)), list(range(1, 40, 2)),
                  lambda fam, cfg, src, recs, tgt, drf: aggregate("syn", fam, cfg, src, recs, tgt, 1, 3, costs, drf),
                  reps=300, costs=costs)
    spec_like = fr.select("chow", "passes_per_token", 1.0)
    router = fr.select("quantile", "target_fraction", 1.0)
    for s in (spec_like, router):
        lo, hi = s.ttft_ci
        assert lo <= s.test.ttft <= hi and s.latency_ci[0] <= s.test.modelled_time <= s.latency_ci[1]
    assert router.test.ttft > 5  # the whole draft answer (20-40 tokens) before the first token, vs one block
    assert fr.select("quantile", "ttft", 1.5).config == "draft-only"  # no router configuration streams early
    md, _ = frontier_markdown(fr, ["chow", "quantile"])
    assert "ttft" in md and "each family minus `quantile`" in md
