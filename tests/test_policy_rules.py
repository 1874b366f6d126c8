"""Every deferral rule's decision on hand-made distributions (tiny vocabularies, probabilities worked out
by hand), and the distribution-level speculative sampling procedure checked against its target ``pi``."""

from __future__ import annotations

import math

import pytest
import torch

from cascade.policies import (
    BiLD,
    BlockConfidence,
    Chow,
    Diff,
    Opt,
    Quantile,
    TokenV1,
    TokenV2,
    TokenV3,
    VerifyDistributions,
    make_policy,
    residual_distribution,
    speculative_acceptance,
    verify_distributions,
)
from cascade.policies.routing import linear_quantile


from test_policies import FakeVerify as Stats  # noqa: E402  (the VerifyStats fields policies read)


def stats_of(q: torch.Tensor, p: torch.Tensor, x: torch.Tensor, greedy: bool = False) -> Stats:
    """Fused statistics of rows q, p [R, V] (rule = sampling distributions unless greedy) at tokens x."""
    rows = torch.arange(len(x))
    qs, ps = q, p
    if greedy:
        qs = torch.zeros_like(q).scatter_(1, q.argmax(1, keepdim=True), 1.0)
        ps = torch.zeros_like(p).scatter_(1, p.argmax(1, keepdim=True), 1.0)
    return Stats(q_token=qs[rows, x], p_token=ps[rows, x], max_q=q.max(1).values, max_p=p.max(1).values,
                 tv=(p - q).clamp_min(0).sum(1), logp_token=p[rows, x].log())


def dists(q, p, x) -> VerifyDistributions:
    q, p = torch.tensor(q, dtype=torch.float64), torch.tensor(p, dtype=torch.float64)
    return VerifyDistributions(tokens=torch.tensor(x), q=q, p=p, q_rule=q, p_rule=p)


# one position, vocabulary of 4; max p = 0.6
Q = [[0.5, 0.3, 0.15, 0.05]]
P = [[0.2, 0.6, 0.1, 0.1]]


def test_chow_diff_opt_deferral_by_hand():
    # rows: (max q, max p, tv)
    max_q = torch.tensor([0.95, 0.5, 0.5, 0.2])
    max_p = torch.tensor([0.99, 0.7, 0.95, 0.9])
    tv = torch.tensor([0.05, 0.3, 0.5, 0.75])
    v = Stats(q_token=max_q, p_token=max_p, max_q=max_q, max_p=max_p, tv=tv, logp_token=max_p.log())
    # chow(0.3): defer where max q < 0.7
    assert Chow(alpha=0.3).deferral(v).tolist() == [0, 1, 1, 1]
    # diff(0.3): max q < max p - 0.3 -> 0.95<0.69 no, 0.5<0.4 no, 0.5<0.65 yes, 0.2<0.6 yes
    assert Diff(alpha=0.3).deferral(v).tolist() == [0, 0, 1, 1]
    # opt(0.3): max q < max p - 0.3 tv -> 0.95<0.975 yes, 0.5<0.61 yes, 0.5<0.8 yes, 0.2<0.675 yes
    assert Opt(alpha=0.3).deferral(v).tolist() == [1, 1, 1, 1]
    # diff and opt disagree on rows 0 and 1 (opt's threshold is never below diff's: tv <= 1)
    # opt with a large alpha defers less: opt(1.0): 0.95<0.94 no, 0.5<0.4 no, 0.5<0.45 no, 0.2<0.15 no
    assert Opt(alpha=1.0).deferral(v).tolist() == [0, 0, 0, 0]
    # delta-mixture acceptance: delta = 0 keeps the draft token; delta = 1 accepts min(1, p/q)
    v2 = Stats(q_token=torch.tensor([0.5, 0.5]), p_token=torch.tensor([0.2, 0.2]), max_q=torch.tensor([0.5, 0.5]),
               max_p=torch.tensor([0.6, 0.9]), tv=torch.tensor([0.3, 0.3]), logp_token=torch.tensor([0.2, 0.2]).log())
    d = Diff(alpha=0.2)  # row 0: 0.5 < 0.4 no -> keep; row 1: 0.5 < 0.7 -> accept 0.4
    assert torch.allclose(d.acceptance(v2, d.deferral(v2)), torch.tensor([1.0, 0.4]))


def test_chow_style_triggers_on_hand_made_confidence():
    conf = BlockConfidence(max_prob=torch.tensor([[0.95, 0.92, 0.0], [0.95, 0.85, 0.99], [0.91, 0.0, 0.0]]),
                           margin=torch.zeros(3, 3), entropy=torch.zeros(3, 3), token_logprob=torch.zeros(3, 3),
                           valid=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool),
                           drafted=torch.tensor([2, 3, 1]))
    rules = (Diff, Opt, TokenV1, TokenV2, TokenV3)
    for pol in (Chow(alpha=0.1),) + tuple(cls(alpha=0.7, trigger_below=0.9) for cls in rules):
        keep, esc = pol.trigger(conf)  # escalate where some valid max q < 0.9 (padding zeros never count)
        assert keep.tolist() == [2, 3, 1] and esc.tolist() == [False, True, False], pol
    for cls in rules:  # the rules' trigger has its own parameter: their alpha does not move it
        for alpha in (0.0, 0.5, 1.0):
            assert cls(alpha=alpha, trigger_below=0.9).trigger(conf)[1].tolist() == [False, True, False]
        # the default (trigger_below = 1) verifies every block, the paper's lossy speculative cascade
        assert cls(alpha=1.0).trigger(conf)[1].tolist() == [True, True, True]
    keep, esc = make_policy("quantile").trigger(conf)
    assert keep.tolist() == [2, 3, 1] and esc.tolist() == [False, False, False]


def test_diff_trigger_is_an_exact_prefilter():
    """max q >= 1 - alpha implies delta = 0 for every max p <= 1 (diff), but not for opt."""
    pol = Diff(alpha=0.2)
    max_q = torch.full((5,), 0.8)
    max_p = torch.tensor([0.8, 0.9, 0.99, 1.0, 0.5])
    v = Stats(q_token=max_q, p_token=max_p, max_q=max_q, max_p=max_p, tv=torch.full((5,), 0.05), logp_token=max_p.log())
    assert pol.deferral(v).tolist() == [0] * 5
    assert Opt(alpha=0.2).deferral(v).tolist() == [0, 1, 1, 1, 0]


@pytest.mark.parametrize("policy, accepted, pi, accept, residual", [
    # V1, alpha 0.25: A = {q(v) >= 0.6 - 0.25 = 0.35} = {0}; eta = 0.5; pi = q 1_A + 0.5 p
    (TokenV1(alpha=0.25), [1, 0, 0, 0], [0.6, 0.3, 0.05, 0.05], [1.0, 1.0, 1 / 3, 1.0], [1.0, 0.0, 0.0, 0.0]),
    # V2, alpha 0.25: A = {p(v) >= 0.35} = {1}; eta = 0.7; pi = [0.14, 0.3 + 0.42, 0.07, 0.07]
    (TokenV2(alpha=0.25), [0, 1, 0, 0], [0.14, 0.72, 0.07, 0.07], [0.28, 1.0, 0.07 / 0.15, 1.0],
     [0.0, 0.42 / 0.44, 0.0, 0.02 / 0.44]),
    # V3, alpha 0.25: A = {p(v) >= 0.75 * 0.6 = 0.45} = {1}: the same as V2 here
    (TokenV3(alpha=0.25), [0, 1, 0, 0], [0.14, 0.72, 0.07, 0.07], [0.28, 1.0, 0.07 / 0.15, 1.0],
     [0.0, 0.42 / 0.44, 0.0, 0.02 / 0.44]),
    # V3, alpha 0.7: A = {p(v) >= 0.18} = {0, 1}; eta = 0.2; pi = [0.5 + 0.04, 0.3 + 0.12, 0.02, 0.02]
    (TokenV3(alpha=0.7), [1, 1, 0, 0], [0.54, 0.42, 0.02, 0.02], [1.0, 1.0, 0.02 / 0.15, 0.4],
     [0.04 / 0.16, 0.12 / 0.16, 0.0, 0.0]),
    # V2, alpha 0.5: A = {p(v) >= 0.1} = every token: pi = q, nothing is ever rejected
    (TokenV2(alpha=0.5), [1, 1, 1, 1], Q[0], [1.0, 1.0, 1.0, 1.0], Q[0]),
])
def test_token_specific_rules_by_hand(policy, accepted, pi, accept, residual):
    d = dists(Q * 4, P * 4, [0, 1, 2, 3])  # the same position, each token drafted once
    assert policy.accepted(d.q_rule, d.p_rule)[0].int().tolist() == accepted
    got_pi, deferred = policy.target_distribution(d, None)
    assert torch.allclose(got_pi, torch.tensor([pi] * 4, dtype=torch.float64))
    assert torch.allclose(got_pi.sum(1), torch.ones(4, dtype=torch.float64))
    assert deferred.tolist() == [1.0 - a for a in accepted]  # per drafted token x: 1 where x is not in A
    assert torch.allclose(speculative_acceptance(got_pi, d.q, d.tokens), torch.tensor(accept, dtype=torch.float64))
    assert torch.allclose(residual_distribution(got_pi, d.q)[0], torch.tensor(residual, dtype=torch.float64))


def test_token_rules_greedy_decisions_from_fused_stats():
    """The VerifyStats-only form (what the replay harness calls on greedy rows) matches the distribution
    form on greedy rows: keep argmax q if it is in A, else emit argmax p."""
    q = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.4, 0.35, 0.2, 0.05], [0.1, 0.6, 0.2, 0.1]])
    p = torch.tensor([[0.2, 0.6, 0.1, 0.1], [0.45, 0.5, 0.03, 0.02], [0.3, 0.6, 0.05, 0.05]])
    x = q.argmax(1)  # greedy drafts: [0, 0, 1]
    for pol in (TokenV1(alpha=0.2), TokenV2(alpha=0.2), TokenV3(alpha=0.2), TokenV1(alpha=0.05), TokenV2(alpha=0.04)):
        v = stats_of(q, p, x, greedy=True)
        fast = pol.acceptance(v, pol.deferral(v))
        d = verify_distributions(q.log(), p.log(), x, torch.zeros(3))  # greedy rows
        pi, deferred = pol.target_distribution(d, v)
        full = speculative_acceptance(pi, d.q, d.tokens)
        assert fast.tolist() == full.tolist() and pol.deferral(v).tolist() == deferred.tolist(), pol
    # by hand, token-v2(0.2): row 0: p(0)=0.2 < 0.4 -> rejected; row 1: p(0)=0.45 >= 0.3 -> kept;
    # row 2: x = 1 = argmax p -> kept
    pol = TokenV2(alpha=0.2)
    v = stats_of(q, p, x, greedy=True)
    assert pol.acceptance(v, pol.deferral(v)).tolist() == [0.0, 1.0, 1.0]
    # token-v1(0.2): q(x) = max q vs max p - 0.2: 0.5 >= 0.4 kept; 0.4 >= 0.3 kept; 0.6 >= 0.4 kept
    pol = TokenV1(alpha=0.2)
    assert pol.acceptance(v, pol.deferral(v)).tolist() == [1.0, 1.0, 1.0]


def test_verify_distributions_greedy_rows_are_one_hot_and_rules_at_t1():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    d = verify_distributions(logits, logits.flip(1), torch.tensor([0, 1]), torch.tensor([0.0, 0.5]))
    assert d.q[0].tolist() == [1.0, 0.0, 0.0]  # greedy row: one-hot sampling distribution
    assert torch.allclose(d.q_rule[0], torch.softmax(logits[0], 0))  # rule distribution at T = 1
    assert torch.allclose(d.q[1], torch.softmax(logits[1] / 0.5, 0)) and torch.allclose(d.q_rule[1], d.q[1])


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chi2

    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


@pytest.mark.parametrize("policy", [
    TokenV1(alpha=0.1),  # A = {0}: pi = [0.46, 0.27, 0.12, 0.03, 0.09, 0.03]
    TokenV2(alpha=0.3),  # A = {1, 2, 4}: pi = [0.054, 0.493, 0.258, 0.027, 0.141, 0.027]
    TokenV3(alpha=0.5),  # A = {1}: pi = [0.075, 0.5875, 0.15, 0.0375, 0.1125, 0.0375]
])
def test_acceptance_and_residual_sample_pi(policy):
    """Draw x ~ q, accept with min(1, pi(x)/q(x)), else draw from norm(max(0, pi - q)): the output is
    distributed as pi (and the same test rejects q and p, so it can fail)."""
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04], dtype=torch.float64)
    p = torch.tensor([0.10, 0.45, 0.20, 0.05, 0.15, 0.05], dtype=torch.float64)
    V = len(q)
    d1 = VerifyDistributions(tokens=torch.tensor([0]), q=q[None], p=p[None], q_rule=q[None], p_rule=p[None])
    v1 = stats_of(q[None], p[None], torch.tensor([0]))
    pi, _ = policy.target_distribution(d1, v1)
    pi = pi[0]
    assert (pi - q).abs().sum() > 0.15 and (pi - p).abs().sum() > 0.15  # a case where the three differ
    n = 60000
    x = torch.multinomial(q, n, replacement=True, generator=g)
    d = VerifyDistributions(tokens=x, q=q.expand(n, V), p=p.expand(n, V), q_rule=q.expand(n, V), p_rule=p.expand(n, V))
    pis, _ = policy.target_distribution(d, stats_of(q.expand(n, V), p.expand(n, V), x))
    accept = speculative_acceptance(pis, d.q, x)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    residual = residual_distribution(pi[None], q[None])[0]
    replacement = torch.multinomial(residual, n, replacement=True, generator=g)
    out = torch.where(u < accept, x, replacement)
    counts = torch.bincount(out, minlength=V).double()
    assert _chi_square_p(counts, pi) > 1e-3
    assert _chi_square_p(counts, q) < 1e-6 and _chi_square_p(counts, p) < 1e-6


def test_bild_trigger_stop_and_rollback_by_hand():
    pol = BiLD(fallback=0.5, rollback=1.0)
    conf = BlockConfidence(max_prob=torch.tensor([[0.9, 0.4, 0.9], [0.9, 0.8, 0.7], [0.3, 0.9, 0.0]]),
                           margin=torch.zeros(3, 3), entropy=torch.zeros(3, 3), token_logprob=torch.zeros(3, 3),
                           valid=torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool),
                           drafted=torch.tensor([3, 3, 2]))
    keep, esc = pol.trigger(conf)
    assert keep.tolist() == [1, 3, 0] and esc.tolist() == [True, False, True]
    assert pol.stop_drafting(torch.tensor([0.49, 0.5, 0.9])).tolist() == [True, False, False]
    # rollback where -log p(x) > 1 nat, i.e. p(x) < 1/e = 0.3679
    logp = torch.tensor([0.5, 0.36, 0.37, 0.0]).log()
    v = Stats(q_token=torch.ones(4), p_token=torch.ones(4), max_q=torch.ones(4), max_p=torch.ones(4),
              tv=torch.zeros(4), logp_token=logp)
    assert pol.acceptance(v, pol.deferral(v)).tolist() == [1.0, 0.0, 1.0, 0.0]
    inf = BiLD(rollback=math.inf)  # inf never rolls back
    assert inf.acceptance(v, inf.deferral(v)).tolist() == [1.0] * 4


@pytest.mark.parametrize("values, level, expected", [
    ([-0.1, -2.0, -0.5, -1.0], 0.0, -2.0),
    ([-0.1, -2.0, -0.5, -1.0], 1.0, -0.1),
    ([-0.1, -2.0, -0.5, -1.0], 0.5, -0.75),  # between -1.0 and -0.5
    ([-0.1, -2.0, -0.5, -1.0], 0.1, -2.0 + 0.3 * 1.0),  # position 0.3 between -2.0 and -1.0
    ([], 0.3, 0.0),
])
def test_quantile_score_and_routing(values, level, expected):
    assert linear_quantile(values, level) == pytest.approx(expected)
    assert linear_quantile(values, level) == pytest.approx(float(torch.quantile(torch.tensor(values or [0.0]), level)))
    pol = Quantile(tau=expected + 1e-6, quantile=level)
    assert pol.route_to_target(values) and not Quantile(tau=expected - 1e-6, quantile=level).route_to_target(values)
    assert not Quantile(tau=-math.inf, quantile=level).route_to_target(values)
    assert Quantile(tau=math.inf, quantile=level).route_to_target(values)
