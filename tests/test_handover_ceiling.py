"""``benchmarks/handover_ceiling.py``'s arithmetic on hand-made requests: the evidence (the order statistic
``takeover`` reads), the cost model of a hand-over, the dev choice within a budget, the AUC, the oracle, and the
rows' consistency (the script itself reads the real pair's recorded answers: see its docstring)."""

import math

import numpy as np
import pytest

from benchmark_scripts import import_benchmark


@pytest.fixture(scope="module")
def hc():
    return import_benchmark("handover_ceiling")


def test_order_statistic_is_takeovers_lower_quantile_of_the_first_t_tokens(hc):
    lp = np.array([-0.1, -3.0, -0.5, -2.0, -0.01])
    assert hc.order_statistic(lp, 2, 0.0) == -3.0
    assert hc.order_statistic(lp, 5, 0.5) == -0.5  # floor(0.5 * 4) = 2nd smallest of 5 (0-based)
    assert hc.order_statistic(lp, 5, 0.25) == -2.0  # floor(0.25 * 4) = 1
    assert hc.order_statistic(lp, math.inf, 1.0) == -0.01
    assert hc.order_statistic(lp, 1, 0.5) == -0.1
    assert hc.order_statistic(np.array([]), 64, 0.1) == math.inf  # no tokens: nothing says hand over


def _req(hc, pid, dc, tc, logprobs, prompt=10, draft_len=None, target_len=20):
    lp = np.asarray(logprobs, dtype=float)
    return hc.Request(pid, prompt, dc, tc, lp.size if draft_len is None else draft_len, target_len, lp)


def test_a_hand_over_pays_the_streamed_prefix_then_the_targets_remaining_answer(hc):
    r = _req(hc, "a", 0.0, 1.0, [-1.0] * 30, prompt=10, target_len=20)
    assert hc.handover_cost(r, math.inf) == 10 + 20  # routing: the target answers from scratch
    assert hc.handover_cost(r, 8) == 10 + 8 + 12  # catch-up over 8 streamed tokens, then 12 more
    assert hc.handover_cost(r, 25) == 10 + 25 + 1  # past the target's own length: at least one more token
    assert hc.handover_cost(r, 64) == 10 + 30 + 1  # the draft's answer ended before t: all of it is read


def test_choose_takes_the_best_dev_quality_within_the_budget(hc):
    # three requests: 0 is worth handing over (draft wrong, target right) and cheap, 1 is worth it but dear, 2 not
    scores = np.array([[-5.0, -4.0, -0.1]])
    costs = np.array([10.0, 50.0, 10.0])
    dc, tc = np.array([0.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0])
    row, tau = hc.choose(scores, costs, dc, tc, norm=100.0, budget=0.2)
    assert row == 0 and -5.0 < tau <= -4.0  # hands over request 0 only: cost 0.1 (0 and 1 together: 0.6 > 0.2)
    row, tau = hc.choose(scores, costs, dc, tc, norm=100.0, budget=1.0)
    assert -4.0 < tau <= -0.1  # everything worth it, and not the free-riding third (same quality, cheaper)
    row, tau = hc.choose(scores, costs, dc, tc, norm=100.0, budget=0.05)
    assert tau == -math.inf  # nothing fits: the draft alone


def test_choose_picks_the_quantile_row_whose_evidence_separates(hc):
    useless = np.array([-1.0, -1.0, -1.0, -1.0])
    telling = np.array([-3.0, -0.1, -0.2, -0.1])
    dc, tc = np.array([0.0, 1.0, 1.0, 1.0]), np.ones(4)
    row, tau = hc.choose(np.stack([useless, telling]), np.full(4, 10.0), dc, tc, norm=40.0, budget=0.3)
    assert row == 1 and -3.0 < tau <= -0.2


def test_auc_counts_pairs_and_half_the_ties(hc):
    scores = np.array([-3.0, -1.0, -2.0, -1.0])
    positive = np.array([True, True, False, False])
    # pairs (pos, neg): (-3,-2) yes, (-3,-1) yes, (-1,-2) no, (-1,-1) tie -> (2 + 0.5) / 4
    assert hc.auc(scores, positive) == pytest.approx(0.625)
    assert math.isnan(hc.auc(scores, np.zeros(4, dtype=bool)))


def test_the_oracle_hands_over_the_worthwhile_requests_cheapest_first(hc):
    costs = np.array([30.0, 10.0, 20.0, 5.0])
    dc, tc = np.array([0.0, 0.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0, 1.0])
    assert hc.oracle_handed(costs, dc, tc, norm=100.0, budget=0.25).tolist() == [False, True, False, False]
    assert hc.oracle_handed(costs, dc, tc, norm=100.0, budget=1.0).tolist() == [True, True, False, False]


def test_rows_pair_every_point_with_routing_and_stay_within_the_oracle(hc):
    rng = np.random.default_rng(0)
    requests = []
    for i in range(40):
        wrong = i % 3 == 0
        lp = rng.normal(-2.0 if wrong else -0.2, 0.3, size=50)  # the wrong answers are less confident throughout
        requests.append(_req(hc, str(i), 0.0 if wrong else 1.0, 1.0, lp, prompt=20, target_len=40))
    dev, test = list(range(0, 40, 2)), list(range(1, 40, 2))
    rows = hc.ceiling_rows("toy", requests, dev, test, points=(8, math.inf), budgets=(0.5,), reps=200)
    assert [(r["evidence"], r["point"]) for r in rows] == [(kind, point) for kind in hc.EVIDENCE for point in (8, "end")]
    early, end = rows[:2]
    assert end["minus_routing"] == 0.0 and end["minus_routing_lo"] == 0.0
    for r in rows[:4]:  # (the prompt-length rule has no signal here: all prompts are alike)
        assert r["test_cost"] <= 0.5 + 0.05  # chosen on dev: test cost close to the budget, not bound by it
        assert r["test_quality"] <= r["oracle_quality"] + 1e-12
        assert r["auc"] > 0.9  # the evidence separates by construction
    assert early["gap_recovered"] == pytest.approx(1.0)  # 8 confident-or-not tokens already tell them apart


def test_the_learned_evidence_is_fitted_on_dev_and_finds_what_the_log_probs_do_not(hc):
    # the requests worth handing over are told apart by their prompt's length alone (short prompts: the target
    # solves them), not by the draft's log-probs, which are the same for all
    requests = []
    for i in range(60):
        kind = i % 3  # 0: worth it (draft wrong, target right), 1: the draft is right, 2: both wrong
        requests.append(_req(hc, str(i), float(kind == 1), float(kind != 2), [-0.5] * 40,
                             prompt=20 if kind == 0 else 200, target_len=40))
    dev, test = list(range(0, 60, 2)), list(range(1, 60, 2))
    worth = np.array([(r.draft_correct < 0.5) and (r.target_correct >= 0.5) for r in requests])
    scores, labels = hc.evidence_scores("learned", requests, 16, np.array(dev), worth)
    assert scores.shape == (1, 60) and labels == ["-"]
    assert worth[test].sum() == 10 and hc.auc(scores[0, test], worth[test]) == pytest.approx(1.0)
    assert hc.auc(scores[0, dev], worth[dev]) == pytest.approx(1.0)
    flat, _ = hc.evidence_scores("log-prob quantile", requests, 16, np.array(dev), worth)
    assert hc.auc(flat[0], worth) == pytest.approx(0.5)  # all tied


def test_fit_logistic_separates_a_separable_feature(hc):
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = np.array([0.0, 0.0, 1.0, 1.0])
    model = hc.fit_logistic(x, y, l2=0.1)
    z = hc.logit(model, x)
    assert (np.diff(z) > 0).all() and z[1] < 0 < z[2]


def test_feature_aucs_name_the_feature_that_separates(hc):
    requests = [_req(hc, str(i), float(i % 2), 1.0, [-0.5] * 10, prompt=20 if i % 2 == 0 else 200) for i in range(20)]
    (row,) = hc.feature_aucs("toy", requests, list(range(20)), points=(4,))
    assert row["point"] == 4 and row["log prompt tokens"] == pytest.approx(1.0)  # short prompts: worth it
    assert row["mean log-prob"] == pytest.approx(0.5)  # all alike: no signal


def test_an_unknown_evidence_kind_is_an_error_naming_it(hc):
    with pytest.raises(ValueError, match="evidence"):
        hc.evidence_scores("vibes", [_req(hc, "a", 0.0, 1.0, [-1.0])], 4, np.array([0]), np.array([True]))


def test_principal_components_are_fitted_on_dev_rows_alone(hc):
    rng = np.random.default_rng(1)
    x = np.outer(rng.normal(size=30), [3.0, 4.0, 0.0]) + 0.01 * rng.normal(size=(30, 3))  # one direction: (0.6, 0.8, 0)
    x[25:] += 100.0  # test rows far away: they must not move the centre or the directions
    dev = np.arange(25)
    pc = hc.principal_components(x, dev, 1)
    assert pc.shape == (30, 1) and abs(pc[dev].mean()) < 1e-9
    direction = np.linalg.lstsq(pc[dev], x[dev] - x[dev].mean(axis=0), rcond=None)[0][0]
    assert abs(abs(direction[0]) - 0.6) < 0.01 and abs(abs(direction[1]) - 0.8) < 0.01


def test_prompt_state_evidence_without_the_states_is_an_error_naming_the_option(hc):
    with pytest.raises(ValueError, match="--prompt-states"):
        hc.evidence_scores("learned: prompt state", [_req(hc, "a", 0.0, 1.0, [-1.0])], 4, np.array([0]), np.array([True]))
