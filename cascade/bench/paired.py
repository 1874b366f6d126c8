"""Paired comparisons of two policies on the same test problems, and what a test split can detect at all.

Two policies answer the same problems, so their per-problem outcomes are paired: what varies between
them is only the problems where they disagree (the discordant pairs). Both tests here use that:

- ``paired_bootstrap``: the mean per-problem difference and its percentile interval over resamples of the
  problems (the same resamples for both policies). A fractional score (a replay estimate: the probability
  that the real answer would be right, not an outcome) is drawn as a Bernoulli outcome in every resample
  (``resample_means``), so an estimate carries an outcome's variance instead of looking certain; 0/1
  scores are untouched.
- ``mcnemar``: McNemar's exact test, a two-sided binomial test on the discordant pairs (b problems only
  the first policy solved, c only the second: p = P(|X - (b + c) / 2| >= |b - (b + c) / 2|), X ~ Bin(b + c,
  1/2)). Defined for 0/1 outcomes only.

What a split can detect (``detectable_difference``): with n test problems and a share d of them discordant
between two policies, the smallest true difference a two-sided paired test at level alpha finds with the
given power (the normal approximation of McNemar's test, Connor 1987: n = (z_a sqrt(d) + z_b sqrt(d -
delta^2))^2 / delta^2, solved for delta). ``min_significant_difference`` is the floor no discordance rate
can beat: McNemar's exact test needs at least 6 discordant problems, all one way, to reach p < 0.05.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedResult:
    """First policy minus second on the same problems."""

    difference: float  # mean per-problem score difference (a proportion: 0.02 = 2 pp)
    ci: tuple[float, float]  # 95 % paired bootstrap interval of it
    p_value: float | None  # McNemar's exact two-sided p (None where a score is fractional)
    wins: int  # problems only the first solved (b)
    losses: int  # problems only the second solved (c)

    @property
    def significant(self) -> bool:
        """The 95 % interval excludes 0 (and, for 0/1 scores, McNemar's p < 0.05 agrees)."""
        lo, hi = self.ci
        boot = lo > 0 or hi < 0
        return boot if self.p_value is None else (boot and self.p_value < 0.05)


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    """The 2.5 / 97.5 percentiles of the finite values (NaN, NaN when there are none)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def resample_means(scores: np.ndarray, boot: np.ndarray) -> np.ndarray:
    """scores [n] in [0, 1]; boot [reps, n] resample indices -> [reps] resample means, each fractional score
    drawn as a Bernoulli outcome with that probability. The draws are seeded by the scores themselves, so a
    policy's draws are the same in every comparison it enters (a - b and b - a mirror each other)."""
    scores = np.asarray(scores, dtype=np.float64)
    picked = scores[boot]
    if _binary(picked):
        return picked.mean(axis=1)
    seed = zlib.crc32(scores.tobytes()) ^ zlib.crc32(np.asarray(boot).tobytes()[:4096])
    draws = np.random.default_rng(seed).random(picked.shape) < picked  # exact for 0 and 1
    return draws.mean(axis=1)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, boot: np.ndarray) -> tuple[float, tuple[float, float]]:
    """a, b [n] per-problem scores on the same problems; boot [reps, n] resample indices -> mean(a - b) and
    its percentile interval (fractional scores drawn as outcomes, each policy's from its own scores)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.shape} vs {b.shape}")
    diff = resample_means(a, boot) - resample_means(b, boot)
    return float((a - b).mean()), percentile_ci(diff)


def _binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0) | (x == 1)))


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[float | None, int, int]:
    """McNemar's exact two-sided p-value of 0/1 scores a vs b on the same problems, and the discordant
    counts (b: a right and b wrong; c: the reverse). p is None if a score is not 0/1."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.shape} vs {b.shape}")
    if not (_binary(a) and _binary(b)):
        return None, int(np.sum(a > b)), int(np.sum(a < b))
    wins, losses = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    m = wins + losses
    if m == 0:
        return 1.0, 0, 0
    k = min(wins, losses)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m  # P(X <= k), X ~ Bin(m, 1/2)
    return min(1.0, 2.0 * tail), wins, losses


def compare(a: np.ndarray, b: np.ndarray, boot: np.ndarray) -> PairedResult:
    """Both tests of a against b."""
    diff, ci = paired_bootstrap(a, b, boot)
    p, wins, losses = mcnemar(a, b)
    return PairedResult(diff, ci, p, wins, losses)


def _z(q: float) -> float:
    """The standard normal quantile, by bisection on the CDF (float-exact; no scipy needed)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def detectable_difference(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference (a proportion) a two-sided paired test at ``alpha`` detects with
    ``power`` on ``n`` problems of which a share ``discordance`` is discordant (see the module docstring).
    NaN when nothing is detectable (no discordance, or a difference larger than the discordance would
    be needed)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance must be in [0, 1], got {discordance}")
    if discordance == 0.0:
        return math.nan
    za, zb = _z(1 - alpha / 2), _z(power)

    def needed(delta: float) -> float:  # problems needed to detect delta
        return (za * math.sqrt(discordance) + zb * math.sqrt(max(0.0, discordance - delta * delta))) ** 2 / delta**2

    lo, hi = 1e-9, discordance  # needed() falls as delta grows; |delta| <= discordance always
    if needed(hi) > n:
        return math.nan
    for _ in range(100):
        mid = (lo + hi) / 2
        if needed(mid) > n:
            lo = mid
        else:
            hi = mid
    return hi


def min_significant_difference(n: int, alpha: float = 0.05) -> float:
    """The smallest observed difference McNemar's exact test can call significant on n problems: m
    discordant problems all one way, for the least m with 2 * 0.5^m < alpha (6 at alpha = 0.05), / n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    m = 1
    while 2.0 * 0.5**m >= alpha:
        m += 1
    return m / n
