"""Policy registry, parsing, and every rule's decision on hand-made confidence / verify statistics."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from cascade.policies import BlockConfidence, Chow, make_policy, parse_policy, policy_names, split_policy_specs


@dataclass(frozen=True)
class FakeVerify:
    """The fields of VerifyStats that policies read."""

    q_token: torch.Tensor
    p_token: torch.Tensor
    max_q: torch.Tensor
    max_p: torch.Tensor
    tv: torch.Tensor
    logp_token: torch.Tensor
    token: torch.Tensor | None = None  # the draft token x (default: token 0 everywhere)
    target_token: torch.Tensor | None = None  # the target's draw (default: -1, never equal to x)

    def __post_init__(self) -> None:
        if self.token is None:
            object.__setattr__(self, "token", torch.zeros(self.q_token.shape, dtype=torch.int64))
        if self.target_token is None:
            object.__setattr__(self, "target_token", torch.full(self.q_token.shape, -1, dtype=torch.int64))


def conf(max_probs: list[list[float]]) -> BlockConfidence:
    lens = [len(r) for r in max_probs]
    K = max(lens)
    mp = torch.zeros(len(lens), K)
    valid = torch.zeros(len(lens), K, dtype=torch.bool)
    for b, r in enumerate(max_probs):
        mp[b, : len(r)] = torch.tensor(r)
        valid[b, : len(r)] = True
    z = torch.zeros_like(mp)
    return BlockConfidence(max_prob=mp, margin=z, entropy=z, token_logprob=z, valid=valid,
                           drafted=torch.tensor(lens, dtype=torch.int64))


def verify(q, p, max_q=None, max_p=None):
    q, p = torch.tensor(q), torch.tensor(p)
    return FakeVerify(q_token=q, p_token=p, max_q=torch.tensor(max_q) if max_q else q, max_p=torch.tensor(max_p) if max_p else p,
                      tv=torch.zeros_like(q), logp_token=p.log())


def test_registry_has_the_issue_policies():
    assert set(policy_names()) == {"draft-only", "target-only", "speculative", "chow", "chow-cut", "diff", "opt", "token-v1",
                                   "token-v2", "token-v3", "bild", "handoff", "handoff-v3", "learned", "quantile", "oracle",
                                   "takeover", "takeover-spec"}


@pytest.mark.parametrize("name", policy_names())
def test_describe_round_trips_through_parse(name):
    pol = make_policy(name)
    assert parse_policy(pol.describe()) == pol and parse_policy(pol.describe()).describe() == pol.describe()
    assert type(pol).__doc__ and len(type(pol).__doc__) > 80  # each rule documents itself


@pytest.mark.parametrize("pol", [
    make_policy("quantile", tau=-math.inf, quantile=0.25), make_policy("quantile", tau=math.inf, k=7),
    make_policy("bild", fallback=0.3, rollback=math.inf, k=4), make_policy("token-v3", alpha=0.0, k=2),
    make_policy("opt", alpha=1), make_policy("chow", alpha=0.125, k=16),
])
def test_describe_round_trips_unusual_values(pol):
    assert parse_policy(pol.describe()) == pol


@pytest.mark.parametrize("spec, expected", [
    ("speculative", make_policy("speculative")),
    ("chow(alpha=0.2)", Chow(alpha=0.2)),
    ("chow:0.2", Chow(alpha=0.2)),
    ("chow:0.2:7", Chow(alpha=0.2, k=7)),
    ("chow( alpha = 0.25 , k = 3 )", Chow(alpha=0.25, k=3)),
    ("bild(fallback=0.4,rollback=2)", make_policy("bild", fallback=0.4, rollback=2)),
    ("diff:0.3", make_policy("diff", alpha=0.3)),
    ("opt:0.3:0.9:4", make_policy("opt", alpha=0.3, trigger_below=0.9, k=4)),
    ("token-v2(alpha=0.05)", make_policy("token-v2", alpha=0.05)),
    ("quantile:-2:0.25", make_policy("quantile", tau=-2.0, quantile=0.25)),
    ("quantile(tau=-inf)", make_policy("quantile", tau=-math.inf)),
    ("bild:0.4:2:8", make_policy("bild", fallback=0.4, rollback=2.0, k=8)),
    ("oracle", make_policy("oracle")),
])
def test_parse_policy(spec, expected):
    assert parse_policy(spec) == expected


@pytest.mark.parametrize("spec, field", [
    ("nope", "unknown policy"), ("chow(alpha=2)", "alpha"), ("chow(alpha=-0.1)", "alpha"), ("chow(k=0)", "k"),
    ("chow(gamma=1)", "gamma"), ("chow(alpha)", "name=value"), ("chow(alpha=x)", "not a number"),
    ("bild(rollback=-1)", "rollback"), ("", "non-empty"), ("chow:0.1:2:3", "at most"),
    ("diff(alpha=1.5)", "alpha"), ("opt(alpha=-1)", "alpha"), ("token-v1(alpha=2)", "alpha"),
    ("token-v3(alpha=-0.5)", "alpha"), ("quantile(quantile=1.5)", "quantile"), ("quantile(tau=nan)", "not a number"),
    ("bild(fallback=1.2)", "fallback"), ("quantile(alpha=0.1)", "alpha"), ("oracle(alpha=0.1)", "alpha"),
])
def test_bad_policy_specs_name_the_problem(spec, field):
    with pytest.raises(ValueError, match=field):
        parse_policy(spec)


@pytest.mark.parametrize("text, specs", [
    ("draft-only, quantile(tau=-1.66, quantile=0),default,", ["draft-only", "quantile(tau=-1.66, quantile=0)", "default"]),
    ("chow(alpha=0.3, k=4);target-only", ["chow(alpha=0.3, k=4)", "target-only"]),
    ("takeover(tau=-0.1, until=inf)", ["takeover(tau=-0.1, until=inf)"]),
    (" , ;", []),
])
def test_a_list_of_policy_specs_splits_outside_parentheses(text, specs):
    assert split_policy_specs(text) == specs
    assert all(parse_policy(s) for s in specs if s != "default")


def test_policies_are_hashable_values():
    assert len({Chow(alpha=0.2), Chow(alpha=0.2), Chow(alpha=0.3)}) == 2
    assert Chow(alpha=0.2).describe() == "chow(k=5, alpha=0.2)"
    assert Chow(alpha=1).describe() == "chow(k=5, alpha=1.0)"  # integer input, canonical float
    assert make_policy("diff", alpha=0.2) != Chow(alpha=0.2)  # same fields, different rule
    with pytest.raises(ValueError, match="tau"):
        make_policy("quantile", tau=float("nan"))


def test_speculative_always_escalates_and_defers():
    pol = make_policy("speculative")
    keep, esc = pol.trigger(conf([[0.99, 0.99], [0.1]]))
    assert keep.tolist() == [2, 1] and esc.tolist() == [True, True]
    v = verify([0.5, 0.2, 0.1], [0.25, 0.4, 0.1])
    assert pol.deferral(v).tolist() == [1, 1, 1]
    assert torch.allclose(pol.acceptance(v, pol.deferral(v)), torch.tensor([0.5, 1.0, 1.0]))


def test_draft_only_never_escalates():
    keep, esc = make_policy("draft-only").trigger(conf([[0.01, 0.01, 0.01]]))
    assert keep.tolist() == [3] and esc.tolist() == [False]


def test_chow_trigger_and_deferral():
    pol = Chow(alpha=0.2)  # threshold 0.8
    keep, esc = pol.trigger(conf([[0.9, 0.95, 0.85], [0.9, 0.7, 0.99], [0.81]]))
    assert keep.tolist() == [3, 3, 1] and esc.tolist() == [False, True, False]
    # padding positions (value 0) must not trigger
    keep, esc = pol.trigger(conf([[0.9], [0.95, 0.99, 0.99]]))
    assert esc.tolist() == [False, False]
    v = verify(q=[0.9, 0.5, 0.6], p=[0.1, 0.6, 0.3], max_q=[0.9, 0.7, 0.79])
    delta = pol.deferral(v)
    assert delta.tolist() == [0.0, 1.0, 1.0]
    # delta 0: pi = q, always accept; delta 1: min(1, p/q)
    assert torch.allclose(pol.acceptance(v, delta), torch.tensor([1.0, 1.0, 0.5]))


def test_mixed_deferral_acceptance_formula():
    pol = make_policy("speculative")
    v = verify(q=[0.5], p=[0.1])
    # pi(x) = 0.5 q + 0.5 p = 0.3 -> accept 0.6
    assert torch.allclose(pol.acceptance(v, torch.tensor([0.5])), torch.tensor([0.6]))


def test_bild_trigger_cuts_at_first_low_confidence_position():
    pol = make_policy("bild", fallback=0.5, rollback=1.0)
    keep, esc = pol.trigger(conf([[0.9, 0.4, 0.9, 0.2], [0.9, 0.8], [0.3, 0.9]]))
    assert keep.tolist() == [1, 2, 0] and esc.tolist() == [True, False, True]
    # hand-over after k = num_small_iters draft tokens even without a fallback (the authors' schedule_iters)
    pol = make_policy("bild", fallback=0.5, rollback=1.0, k=2)
    keep, esc = pol.trigger(conf([[0.9, 0.8], [0.9]]))
    assert keep.tolist() == [2, 1] and esc.tolist() == [True, False]


def test_bild_rollback_on_target_cross_entropy():
    pol = make_policy("bild", fallback=0.5, rollback=1.0)  # reject where -log p(x) > 1, i.e. p(x) < e^-1 = 0.368
    v = verify(q=[0.9, 0.9, 0.9], p=[0.5, 0.3, 0.37])
    assert pol.acceptance(v, pol.deferral(v)).tolist() == [1.0, 0.0, 1.0]
    # no rollback where the target's replacement is the draft token itself (authors' code)
    v = dataclasses.replace(v, token=torch.tensor([4, 5, 6]), target_token=torch.tensor([1, 5, 2]))
    assert pol.acceptance(v, pol.deferral(v)).tolist() == [1.0, 1.0, 1.0]
    assert type(pol).replace_from_target and not type(make_policy("chow")).replace_from_target
