"""Paired comparisons against hand-computed cases: McNemar's exact test, the paired bootstrap, and what a
test split of n problems can detect."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cascade.bench.paired import compare, detectable_difference, mcnemar, min_significant_difference, paired_bootstrap


def test_mcnemar_exact_by_hand():
    a = np.array([1, 1, 1, 0, 1, 0, 1, 1])
    b = np.array([0, 1, 0, 0, 1, 1, 0, 0])
    # discordant: a alone right on problems 0, 2, 6, 7 (b = 4), b alone on problem 5 (c = 1):
    # p = 2 * P(X <= 1), X ~ Bin(5, 1/2) = 2 * (1 + 5) / 32
    p, wins, losses = mcnemar(a, b)
    assert (wins, losses) == (4, 1) and p == pytest.approx(12 / 32)
    p, wins, losses = mcnemar(np.ones(6), np.zeros(6))  # six wins, no loss: 2 / 64 < 0.05
    assert (wins, losses) == (6, 0) and p == pytest.approx(2 / 64)
    assert mcnemar(np.ones(5), np.zeros(5))[0] == pytest.approx(2 / 32)  # five are not enough at 0.05
    assert mcnemar(a, a) == (1.0, 0, 0)
    assert mcnemar(np.array([0.5, 1.0]), np.array([0.0, 1.0]))[0] is None  # fractional (replay estimates): no p


def test_paired_bootstrap_by_hand():
    a = np.array([1.0, 1.0, 0.0, 1.0])
    b = np.array([0.0, 1.0, 0.0, 0.0])
    boot = np.array([[0, 1, 2, 3], [0, 0, 0, 0], [1, 1, 2, 2], [3, 3, 3, 1]])  # resample means: .5, 1, 0, .75
    diff, (lo, hi) = paired_bootstrap(a, b, boot)
    assert diff == 0.5
    assert lo == pytest.approx(np.percentile([0.5, 1, 0, 0.75], 2.5)) and hi == pytest.approx(np.percentile([0.5, 1, 0, 0.75], 97.5))
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap(a, b[:3], boot)


def test_compare_calls_a_lead_significant_only_when_both_tests_agree():
    rng = np.random.default_rng(0)
    boot = rng.integers(0, 200, size=(2000, 200))
    a = np.zeros(200)
    a[:20] = 1  # 20 wins, no losses
    r = compare(a, np.zeros(200), boot)
    assert r.significant and r.difference == pytest.approx(0.1) and r.p_value < 1e-5 and (r.wins, r.losses) == (20, 0)
    c = np.zeros(200)
    c[:3] = 1  # 3 wins: McNemar p = 0.25
    r = compare(c, np.zeros(200), boot)
    assert not r.significant and r.p_value == pytest.approx(0.25)


def test_detectable_difference_matches_the_formula():
    # n = (z_.975 sqrt(d) + z_.8 sqrt(d - delta^2))^2 / delta^2 with d = 0.2, delta = 0.1: 154.6 problems
    za, zb = 1.959964, 0.841621
    n = (za * math.sqrt(0.2) + zb * math.sqrt(0.2 - 0.01)) ** 2 / 0.01
    assert n == pytest.approx(154.6, abs=0.1)
    assert detectable_difference(math.ceil(n), 0.2) == pytest.approx(0.1, abs=5e-4)
    assert detectable_difference(4 * 155, 0.2) < detectable_difference(155, 0.2)  # more problems, finer
    assert detectable_difference(155, 0.05) < detectable_difference(155, 0.2)  # less discordance, finer
    assert math.isnan(detectable_difference(100, 0.0))
    with pytest.raises(ValueError, match="discordance"):
        detectable_difference(100, 1.5)


def test_min_significant_difference():
    assert min_significant_difference(100) == pytest.approx(0.06)  # six problems, all one way
    assert min_significant_difference(60, alpha=0.01) == pytest.approx(8 / 60)  # 2 * 0.5^8 < 0.01 <= 2 * 0.5^7



def test_fractional_scores_carry_an_outcomes_variance():
    """A replay estimate (the probability the real answer would be right) is drawn as an outcome in each
    resample: its interval is as wide as a coin's, not zero; 0/1 scores resample exactly as before."""
    from cascade.bench.paired import resample_means

    boot = np.random.default_rng(0).integers(0, 100, size=(2000, 100))
    coin = resample_means(np.array([0.5]), np.zeros((2000, 1), dtype=int))  # one problem, drawn each time
    assert set(coin.tolist()) == {0.0, 1.0} and 0.4 < coin.mean() < 0.6  # a coin, not a constant 0.5
    binary = (np.arange(100) % 2).astype(float)
    assert np.array_equal(resample_means(binary, boot), binary[boot].mean(axis=1))
    half = np.full(100, 0.5)
    _, (lo, hi) = paired_bootstrap(half, np.zeros(100), boot)
    assert lo < 0.45 and hi > 0.55  # not the zero-width interval a constant 0.5 would give
    assert resample_means(half, boot).tolist() == resample_means(half, boot).tolist()  # seeded by the scores
    other = np.linspace(0.1, 0.9, 100)
    d1, ci1 = paired_bootstrap(other, half, boot)
    d2, ci2 = paired_bootstrap(half, other, boot)
    assert d1 == -d2 and ci1 == pytest.approx((-ci2[1], -ci2[0]))  # a - b mirrors b - a
