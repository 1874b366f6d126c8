"""``takeover``: the evidence it carries (exactly quantile's lower order statistic), when the hand-over fires,
and, on a tiny random pair through the real engine: it streams from the first round, never takes a streamed
token back, hands over where its evidence says, and after a hand-over its greedy output is the target's greedy
continuation of the streamed prefix."""

from __future__ import annotations

import math
import random

import pytest
import torch

from cascade import SamplingParams, TokenSource
from cascade.policies import make_policy, parse_policy
from cascade.policies.state import RoundOutcome, stack, unstack
from cascade.policies.takeover import TakeoverState, below_quantile

from test_engine import PROMPTS, make_cascade

MAX_TOKENS = 24


def lower_quantile(values: list[float], level: float) -> float:
    """The lower order statistic at ``level`` (index floor(level * (n - 1)) of the sorted values)."""
    xs = sorted(values)
    return xs[math.floor(level * (len(xs) - 1))]


@pytest.mark.parametrize("level", [0.0, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_two_counts_decide_the_lower_quantile_exactly(level):
    rng = random.Random(int(level * 100))
    for _ in range(300):
        n = rng.randint(1, 40)
        values = [rng.choice([-3.0, -2.0, -1.0, -0.5, -0.1]) + rng.random() * 0.01 for _ in range(n)]
        tau = rng.choice([-2.5, -1.5, -0.7, -0.05, -3.5])
        low = sum(v < tau for v in values)
        said = below_quantile(torch.tensor([low]), torch.tensor([n]), level)
        assert bool(said) == (lower_quantile(values, level) < tau), (values, tau, level)
    assert below_quantile(torch.tensor([0]), torch.tensor([0]), level).tolist() == [False]  # no evidence yet


def after_round(policy, states, emitted, logprobs, escalated=None):
    width = max(len(r) for r in logprobs)
    lp = torch.tensor([r + [0.0] * (width - len(r)) for r in logprobs])
    escalated = torch.tensor(escalated if escalated is not None else [False] * len(states))
    return unstack(policy.after_round(stack(states), RoundOutcome(escalated, torch.tensor(emitted), lp)))


def test_the_evidence_counts_the_round_and_the_hand_over_fires_where_it_says():
    p = make_policy("takeover", tau=-1.0, quantile=0.25, after=4.0)
    assert p.init_state() == TakeoverState(0, 0, False)
    # 4 tokens, 2 below -1: the lower 0.25-quantile (index floor(0.75) = 0) is -2 < -1: hand over
    # 4 tokens, 0 below: keep drafting; 3 tokens (< after): no decision yet, whatever the evidence
    out = after_round(p, [TakeoverState()] * 3, [4, 4, 3], [[-2.0, -0.1, -3.0, -0.2], [-0.1] * 4, [-5.0] * 3])
    assert out == [TakeoverState(4, 2, True), TakeoverState(4, 0, False), TakeoverState(3, 3, False)]
    # padding past emitted is not evidence; a handed-over request counts nothing more and stays handed over
    out = after_round(p, [TakeoverState(4, 0, False), TakeoverState(4, 2, True)], [1, 5], [[-0.1, -9.0], [-9.0] * 5],
                      escalated=[False, True])
    assert out == [TakeoverState(5, 0, False), TakeoverState(4, 2, True)]


def test_a_fixed_point_decides_once_and_continuous_decides_later_too():
    once = make_policy("takeover", tau=-1.0, quantile=0.0, after=4.0, until=4.0)
    cont = make_policy("takeover", tau=-1.0, quantile=0.0, after=4.0)
    first = [TakeoverState()]
    lps = [[-0.1] * 5]  # the first chance (5 tokens, the round that passed `after`): nothing below tau
    assert after_round(once, first, [5], lps) == after_round(cont, first, [5], lps) == [TakeoverState(5, 0, False)]
    later = [TakeoverState(5, 0, False)]
    uncertain = [[-0.1, -4.0, -0.1]]
    assert after_round(once, later, [3], uncertain) == [TakeoverState(8, 1, False)]  # past its one chance
    assert after_round(cont, later, [3], uncertain) == [TakeoverState(8, 1, True)]


def test_an_escalated_round_hands_over():
    """The token-level entry's block was verified: the request is handed over, whatever the log-prob evidence."""
    p = make_policy("takeover", tau=-9.0, after=64.0, trigger_below=0.3)
    out = after_round(p, [TakeoverState()] * 2, [3, 5], [[-0.1] * 3, [-0.1] * 5], escalated=[True, False])
    assert out == [TakeoverState(3, 0, True), TakeoverState(5, 0, False)]


@pytest.mark.parametrize("field,value", [("tau", float("nan")), ("quantile", 1.5), ("after", 0.0), ("until", -1.0),
                                         ("trigger_below", 1.5)])
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        make_policy("takeover", **{field: value})


def test_describe_reads_back():
    p = make_policy("takeover", tau=-2.0, quantile=0.1, after=16.0, until=16.0, trigger_below=0.2, k=4)
    assert parse_policy(p.describe()) == p


# ---------------------------------------------------------------- the real engine on a tiny random pair


@pytest.fixture(scope="module")
def pair(tiny_pair_dirs):
    return make_cascade(tiny_pair_dirs)


def streamed(c, prompts, policy, max_tokens=MAX_TOKENS):
    """Run through ``Engine.step`` as a server streams: per request, the deltas of every round."""
    engine = c.engine
    for i, ids in enumerate(prompts):
        engine.add_request(f"s{i}", ids, SamplingParams(max_tokens=max_tokens), parse_policy(policy))
    deltas = {f"s{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            deltas[o.request_id].append(o.new_tokens)
    return [deltas[f"s{i}"] for i in range(len(prompts))]


def hand_over_point(tokens) -> int | None:
    """Index of the first token the draft did not decide alone (None: the draft wrote the whole answer)."""
    return next((j for j, t in enumerate(tokens) if t.source is not TokenSource.DRAFT), None)


@pytest.mark.parametrize("name", ["takeover", "takeover-spec"])
def test_it_streams_from_the_first_round_and_never_takes_a_token_back(pair, name):
    policy = f"{name}(tau=1.0, after=6)"  # hands over at its first chance
    rounds = streamed(pair, PROMPTS, policy)
    final = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy=policy)
    for deltas, result in zip(rounds, final):
        assert len(deltas[0]) > 0  # the first round's tokens are streamed at once (quantile's are held back)
        assert [t.id for d in deltas for t in d] == result.token_ids  # the deltas add up to the answer, in order
        h = hand_over_point([t for d in deltas for t in d])
        assert h is not None and h >= 6 and h % 5 == 0  # after the first round end past 6 tokens (k = 5)


@pytest.mark.parametrize("policy", ["takeover(tau=1.0, after=6)", "takeover(tau=-2.5, quantile=0.25, after=4)",
                                    "takeover-spec(tau=1.0, after=1, k=3)", "takeover-spec(tau=-2.5, quantile=0.25, after=4)"])
def test_after_a_hand_over_greedy_is_the_targets_continuation_of_the_streamed_prefix(pair, policy):
    results = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy=policy)
    draft = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy="draft-only")
    handed = 0
    for prompt, r, d in zip(PROMPTS, results, draft):
        h = hand_over_point(r.tokens)
        if h is None:
            assert r.token_ids == d.token_ids and r.stats.escalations == 0
            continue
        handed += 1
        assert r.token_ids[:h] == d.token_ids[:h]  # the streamed prefix is the draft's own answer
        rest = pair.generate([prompt + r.token_ids[:h]], SamplingParams(max_tokens=MAX_TOKENS - h), policy="target-only")[0]
        assert r.token_ids[h:] == rest.token_ids
        if policy.startswith("takeover("):  # the target decodes the rest alone: one pass per token, no escalation
            assert all(t.source is TokenSource.TARGET for t in r.tokens[h:])
            assert r.stats.escalations == 0 and r.stats.target_only_steps == len(r.token_ids) - h
        else:  # every later block verified
            assert all(t.source is not TokenSource.DRAFT for t in r.tokens[h:]) and r.stats.escalations > 0
    assert handed > 0


@pytest.mark.parametrize("name", ["takeover", "takeover-spec"])
def test_the_hand_over_fires_at_the_first_round_end_where_the_evidence_says(pair, name):
    policy = make_policy(name, tau=-2.5, quantile=0.25, after=4.0)
    results = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy=policy)
    draft = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy="draft-only")
    outcomes = set()
    for r, d in zip(results, draft):
        lps = d.token_logprobs  # the draft's greedy answer: what takeover streams until it hands over
        ends = [e for e in range(policy.k, MAX_TOKENS + 1, policy.k) if e >= policy.after]  # draft rounds emit k
        fires = [e for e in ends if lower_quantile(lps[:e], policy.quantile) < policy.tau]
        h = hand_over_point(r.tokens)
        expected = fires[0] if fires and fires[0] < MAX_TOKENS else None
        assert h == expected, (lps, h, fires)
        outcomes.add(h is None)
    assert outcomes == {True, False}  # some answers handed over, some not


@pytest.mark.parametrize("name", ["takeover", "takeover-spec"])
def test_the_token_level_entry_verifies_the_first_uncertain_block_and_hands_over(pair, name):
    """With ``trigger_below`` (and no log-prob evidence: tau = -inf) the first draft block holding a position less
    confident than it is verified, and the target answers from there: the output is the draft's answer up to that
    block, then the target's greedy continuation of it (lossless verification, then the target)."""
    k = 4
    policy = make_policy(name, tau=-math.inf, trigger_below=0.08, k=k)  # the tiny pair's max q: ~0.05 .. 0.3
    results = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy=policy)
    draft = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy="draft-only")
    outcomes = set()
    for prompt, r, d in zip(PROMPTS, results, draft):
        confident = [math.exp(lp) >= policy.trigger_below for lp in d.token_logprobs]
        blocks = [b for b in range(0, MAX_TOKENS, k) if not all(confident[b:b + k])]
        h = hand_over_point(r.tokens)
        if not blocks:
            assert h is None and r.token_ids == d.token_ids
            outcomes.add(None)
            continue
        assert h == blocks[0], (confident, h)
        rest = pair.generate([prompt + d.token_ids[:h]], SamplingParams(max_tokens=MAX_TOKENS - h), policy="target-only")[0]
        assert r.token_ids == d.token_ids[:h] + rest.token_ids
        outcomes.add(h == 0)
    assert len(outcomes) >= 2  # the entry fires in different places


def test_an_entry_at_every_block_is_target_only(pair):
    """``trigger_below = 1``: the first block is verified and the target decodes the rest: target-only's answer."""
    results = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy="takeover(tau=-inf, trigger_below=1)")
    target = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy="target-only")
    assert [r.token_ids for r in results] == [t.token_ids for t in target]
