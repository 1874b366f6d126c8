"""``benchmarks/default_latency.py``'s bookkeeping: the paired ratios of means and their interval, the summary
per dataset and over all (the policy list's parsing: ``tests/test_policies.py``; the bench itself loads the real pair: see the script)."""

import pytest

from benchmark_scripts import import_benchmark


@pytest.fixture(scope="module")
def dl():
    return import_benchmark("default_latency")


def test_ratio_interval_is_the_ratio_of_sums_and_covers_it(dl):
    ratio, lo, hi = dl.ratio_interval([1.0, 2.0, 3.0, 6.0], [1.0, 1.0, 1.0, 1.0])
    assert ratio == pytest.approx(3.0)
    assert 1.0 <= lo <= ratio <= hi <= 6.0
    assert dl.ratio_interval([2.0] * 5, [1.0] * 5) == (pytest.approx(2.0),) * 3  # no spread, no width
    assert all(v != v for v in dl.ratio_interval([], []))  # nothing to pair: nan


def test_summarise_pairs_each_policy_with_the_baselines_on_the_same_problems(dl):
    rows = []
    for ds, pid, d_ttft, t_lat in (("a", "1", 1.0, 10.0), ("a", "2", 2.0, 20.0), ("b", "1", 1.0, 30.0)):
        base = {"dataset": ds, "problem_id": pid, "finish_reason": "stop"}
        rows += [{**base, "policy": "draft-only", "correct": 0.0, "ttft_s": d_ttft, "latency_s": 5.0, "target_positions": 0},
                 {**base, "policy": "target-only", "correct": 1.0, "ttft_s": 3 * d_ttft, "latency_s": t_lat, "target_positions": 100},
                 {**base, "policy": "p", "correct": 1.0, "ttft_s": 1.5 * d_ttft, "latency_s": t_lat / 2, "target_positions": 20}]
    rows.append({"dataset": "b", "problem_id": "2", "finish_reason": "length", "policy": "p", "correct": 0.0,
                 "ttft_s": 9.0, "latency_s": 9.0, "target_positions": 9})  # no baselines for it: left out
    by = {(s["dataset"], s["policy"]): s for s in dl.summarise(rows, ["draft-only", "target-only", "p"])}
    assert by[("a", "p")]["ttft_vs_draft"] == pytest.approx(1.5) and by[("a", "p")]["latency_vs_target"] == pytest.approx(0.5)
    assert by[("all", "p")]["n"] == 3 and by[("all", "p")]["target_fraction"] == pytest.approx(0.2)
    assert by[("b", "p")]["hit_max_tokens"] == 0 and by[("all", "target-only")]["quality"] == 1.0
