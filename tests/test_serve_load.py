"""``benchmarks/serve_load.py``'s run order and paired ratios (the load itself runs the real server: see the
script; these check the bookkeeping that turns its levels into the reported ratios)."""

import pytest

from benchmark_scripts import import_benchmark


@pytest.fixture(scope="module")
def serve_load():
    return import_benchmark("serve_load")


def test_schedule_rotates_policies_so_each_runs_at_each_position_once(serve_load):
    policies = ["target-only", "speculative", "chow"]
    plan = serve_load.schedule(policies, [1, 16], repeats=3)
    assert len(plan) == 3 * 2 * 3
    for c in (1, 16):
        for policy in policies:
            positions = sorted(pos for r, cc, pos, p in plan if cc == c and p == policy)
            assert positions == [0, 1, 2]
    # within a repeat, every concurrency runs all policies back to back before the next concurrency
    assert [(r, c) for r, c, _, _ in plan[:6]] == [(0, 1)] * 3 + [(0, 16)] * 3
    assert [p for r, c, _, p in plan if r == 1 and c == 1] == ["speculative", "chow", "target-only"]
    with pytest.raises(ValueError, match="--repeats"):
        serve_load.schedule(policies, [1], repeats=0)


def _level(serve_load, policy, c, r, tps, failed=0):
    return serve_load.Level(policy=policy, concurrency=c, repeat=r, position=0, requests=4, failed=failed,
                            completion_tokens=100, wall_s=1.0, tokens_per_s=tps, latency_p50_s=1.0,
                            latency_p95_s=2.0, ttft_p50_s=0.1, ttft_p95_s=0.2, target_token_fraction=0.5)


def test_summarise_pairs_ratios_within_a_repeat(serve_load):
    levels = [
        _level(serve_load, "target-only", 1, 0, 10.0), _level(serve_load, "speculative", 1, 0, 12.0),
        _level(serve_load, "target-only", 4, 0, 30.0), _level(serve_load, "speculative", 4, 0, 27.0),
        # the second repeat runs slower overall: paired ratios are unaffected by the drift
        _level(serve_load, "target-only", 1, 1, 5.0), _level(serve_load, "speculative", 1, 1, 7.0),
        _level(serve_load, "target-only", 4, 1, 15.0), _level(serve_load, "speculative", 4, 1, 15.0, failed=1),
    ]
    by = {(s.policy, s.concurrency): s for s in serve_load.summarise(levels)}
    spec4 = by[("speculative", 4)]
    assert spec4.repeats == 2 and spec4.failed == 1
    assert spec4.tokens_per_s == pytest.approx(21.0)
    assert (spec4.tokens_per_s_min, spec4.tokens_per_s_max) == (15.0, 27.0)
    assert spec4.ratio_vs_target_only == pytest.approx((0.9 + 1.0) / 2)
    assert (spec4.ratio_min, spec4.ratio_max) == (pytest.approx(0.9), pytest.approx(1.0))
    assert spec4.speedup_vs_concurrency_1 == pytest.approx((27 / 12 + 15 / 7) / 2)
    spec1 = by[("speculative", 1)]
    assert spec1.ratio_vs_target_only == pytest.approx((1.2 + 1.4) / 2)
    assert by[("target-only", 4)].ratio_vs_target_only == pytest.approx(1.0)


def test_summary_csv_round_trips_and_replots(serve_load, tmp_path):
    levels = [_level(serve_load, p, c, r, 10.0 + r + c) for r in range(2) for c in (1, 4)
              for p in ("target-only", "speculative")]
    summaries = serve_load.summarise(levels)
    path = tmp_path / "load.csv"
    serve_load.write_rows(path, summaries)
    back = serve_load._read_rows(path, serve_load.Summary)
    assert [(s.policy, s.concurrency, s.repeats) for s in back] == [(s.policy, s.concurrency, s.repeats) for s in summaries]
    assert serve_load.main(["--replot", str(path)]) == 0
    assert path.with_suffix(".png").stat().st_size > 0


def test_ratio_intervals_are_t_intervals_over_repeats(serve_load):
    lo, hi = serve_load.mean_interval([0.9, 1.0, 1.1])
    half = 4.302653 * 0.1 / 3 ** 0.5  # t(0.975, df=2) * sd / sqrt(n)
    assert (lo, hi) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))
    assert all(x != x for x in serve_load.mean_interval([1.0]))  # one repeat: no interval (nan)
    levels = [_level(serve_load, "target-only", 16, r, 10.0) for r in range(3)]
    levels += [_level(serve_load, "speculative", 16, r, tps) for r, tps in enumerate((9.0, 10.0, 11.0))]
    spec = {s.policy: s for s in serve_load.summarise(levels)}["speculative"]
    assert (spec.ratio_lo95, spec.ratio_hi95) == (pytest.approx(1.0 - half, abs=1e-5), pytest.approx(1.0 + half, abs=1e-5))
    assert spec.ratio_min == pytest.approx(0.9) and spec.ratio_max == pytest.approx(1.1)


def test_an_older_summary_csv_without_intervals_still_replots(serve_load, tmp_path):
    summaries = serve_load.summarise([_level(serve_load, "target-only", c, 0, 10.0 * c) for c in (1, 4)])
    path = tmp_path / "old.csv"
    serve_load.write_rows(path, summaries)
    header, *rows = path.read_text().splitlines()
    keep = [i for i, name in enumerate(header.split(",")) if not name.endswith("95")]
    path.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in [header, *rows]) + "\n")
    back = serve_load._read_rows(path, serve_load.Summary)
    assert back[1].tokens_per_s == pytest.approx(40.0) and back[1].ratio_lo95 != back[1].ratio_lo95
    assert serve_load.main(["--replot", str(path)]) == 0


def test_host_probe_correlation_and_default_level_sizes(serve_load):
    levels = []
    for r, host in enumerate((18.0, 21.0, 24.0)):  # throughput follows the host's bandwidth in every group
        for policy, base in (("target-only", 50.0), ("speculative", 60.0)):
            lv = _level(serve_load, policy, 16, r, base * host / 21.0)
            lv.host_gb_s = host
            levels.append(lv)
    assert serve_load.host_correlation(levels) == pytest.approx(1.0)
    unprobed = serve_load.host_correlation([_level(serve_load, "target-only", 1, r, 5.0 + r) for r in range(3)])
    assert unprobed != unprobed  # no probe (nan bandwidth): no correlation (nan)
    assert [serve_load.requests_per_level(c) for c in (1, 4, 16, 64)] == [3, 8, 16, 16]


def test_memory_bandwidth_probe_measures_and_rejects_bad_input():
    machine = import_benchmark("machine")
    assert machine.memory_bandwidth_gb_s(0.05, mib=4) > 0
    with pytest.raises(ValueError, match="seconds"):
        machine.memory_bandwidth_gb_s(0)
