"""``handoff`` / ``handoff-v3``: the entry test (threshold and cost-aware price) on hand-made confidences,
the window's bookkeeping, and the engine's rounds on a scripted pair worked out by hand (the window opens
at the first uncertain block, verifies every block while it lasts, then hands back to the draft)."""

from __future__ import annotations

import math

import pytest
import torch

from cascade import SamplingParams, TokenSource
from cascade.policies import BlockConfidence, make_policy, parse_policy
from cascade.policies.handoff import HandoffState
from cascade.policies.state import RoundOutcome, stack, unstack

from scripted_pair import chain, scripted_cascade


def conf(max_prob, catch_up=None, window_left=None):
    m = torch.tensor(max_prob, dtype=torch.float32)
    B, K = m.shape
    return BlockConfidence(max_prob=m, margin=m, entropy=torch.zeros(B, K), token_logprob=m.log(),
                           valid=torch.ones(B, K, dtype=torch.bool), drafted=torch.full((B,), K),
                           catch_up=None if catch_up is None else torch.tensor(catch_up),
                           state=None if window_left is None else stack([HandoffState(w) for w in window_left]))


def test_entry_by_threshold_and_inside_a_window():
    p = make_policy("handoff", trigger_below=0.5, window=8.0)
    keep, esc = p.trigger(conf([[0.9, 0.4], [0.9, 0.9], [0.9, 0.9]], window_left=[0.0, 0.0, 3.0]))
    assert keep.tolist() == [2, 2, 2]
    assert esc.tolist() == [True, False, True]  # uncertain / confident / confident but inside a window


def test_cost_aware_entry_weighs_expected_errors_against_the_positions_paid():
    # expected errors = 0.6 + 0.1 = 0.7; positions paid = catch_up + 2 drafted + 1 bonus
    p = make_policy("handoff", trigger_below=1.0, price=0.15, window=0.0)
    _, esc = p.trigger(conf([[0.4, 0.9]] * 3, catch_up=[0, 1, 2]))
    assert esc.tolist() == [True, True, False]  # 0.7 >= 0.15 x 3 and 0.15 x 4, but not >= 0.15 x 5
    # price 0: the plain threshold, whatever the catch-up
    _, esc = make_policy("handoff", trigger_below=0.5).trigger(conf([[0.4, 0.9]], catch_up=[100]))
    assert esc.tolist() == [True]
    # both knobs: a block must be uncertain AND worth its cost
    _, esc = make_policy("handoff", trigger_below=0.3, price=0.01).trigger(conf([[0.4, 0.9]]))
    assert esc.tolist() == [False]


def window_after(policy, window_left, escalated, emitted) -> list[float]:
    """The windows left after a round, through the policy's state contract (stack -> after_round -> unstack)."""
    after = policy.after_round(stack([HandoffState(w) for w in window_left]),
                               RoundOutcome(torch.tensor(escalated), torch.tensor(emitted), torch.zeros(len(emitted), 8)))
    return [s.window_left for s in unstack(after)]


def test_window_bookkeeping():
    p = make_policy("handoff", window=8.0)
    assert p.init_state() == HandoffState(window_left=0.0)  # a request starts outside a window
    left = window_after(p, [0.0, 5.0, 2.0, 0.0], [True, True, True, False], [3, 2, 4, 5])
    assert left == [5.0, 3.0, 0.0, 0.0]  # opens 8 - 3; goes on 5 - 2; ends; no escalation, no window
    forever = make_policy("handoff", window=math.inf)
    assert window_after(forever, [0.0], [True], [6]) == [math.inf]
    assert window_after(make_policy("handoff", window=0.0), [0.0], [True], [3]) == [0.0]


@pytest.mark.parametrize("bad", [{"window": -1.0}, {"price": -0.1}, {"trigger_below": 1.5}, {"window": float("nan")}])
def test_bad_parameters_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_policy("handoff", **bad)


def test_describe_round_trips_with_an_infinite_window():
    p = make_policy("handoff-v3", alpha=0.2, trigger_below=0.7, price=0.01, window=math.inf, k=4)
    assert parse_policy(p.describe()) == p and p.State is HandoffState and p.needs_distributions


# ------------------------------------------------------------------ the engine's rounds, by hand
@pytest.fixture(scope="module")
def pair():
    # draft: 0 -> 1 -> 2 -> ..., sure everywhere except of the token after 3 (max prob 0.3)
    draft = chain({i: i + 1 for i in range(13)}, confidence={3: 0.3})
    # target: the same chain, except 5 -> 11 and 12 -> 7
    target = chain({**{i: i + 1 for i in range(13)}, 5: 11, 12: 7})
    return scripted_cascade(draft, target)


def one(c, policy, max_tokens=8):
    [r] = c.generate([[0]], SamplingParams(max_tokens=max_tokens), policy=parse_policy(policy))
    assert c.engine.scheduler.num_free_rows == c.engine.max_rows
    return r


def test_a_window_opens_at_the_first_uncertain_block_and_closes_after_window_tokens(pair):
    # round 1: [1, 2] confident, kept as drafted. round 2: [3, 4] (unsure of 4) opens a window of 4: the target
    # catches up on 1, 2, accepts 3, 4 and adds the bonus 5 (3 tokens, 1 left). round 3, inside the window:
    # [6, 7] rejected at once, the target's 11 replaces 6 (window closed). round 4: [12, 13] confident, kept
    # unverified although the target would say 7 after 12.
    r = one(pair, "handoff(trigger_below=0.5, window=4, k=2)")
    assert r.token_ids == [1, 2, 3, 4, 5, 11, 12, 13]
    S = TokenSource
    assert r.token_sources == [S.DRAFT, S.DRAFT, S.VERIFIED, S.VERIFIED, S.BONUS, S.TARGET, S.DRAFT, S.DRAFT]
    s = r.stats
    assert s.escalations == 2
    # round 2: catch-up 1, 2 + block 3, 4 fed (4, the prompt's prefill apart); round 3: 5 + block 6, 7 (3)
    assert s.target_tokens == 7 and s.target_prefill_tokens == 1
    assert s.target_scored_tokens == 3 + 3


def test_an_endless_window_is_speculative_decoding_from_the_first_uncertain_block(pair):
    r = one(pair, "handoff(trigger_below=0.5, window=inf, k=2)")
    assert r.token_ids == [1, 2, 3, 4, 5, 11, 12, 7]  # the last block is verified too: 7 after 12
    assert r.stats.escalations == 3
    spec = one(pair, "speculative(k=2)")
    assert spec.token_ids == r.token_ids  # the first round's confident tokens were the target's too


def test_a_zero_window_verifies_the_entry_block_alone(pair):
    r = one(pair, "handoff(trigger_below=0.5, window=0, k=2)")
    # round 3 is outside any window: [6, 7] is confident and kept as drafted
    assert r.token_ids == [1, 2, 3, 4, 5, 6, 7, 8] and r.stats.escalations == 1


def test_handoff_verifying_every_block_is_lossless(pair):
    every = one(pair, "handoff(trigger_below=1.0, window=0, k=3)", max_tokens=10)
    target = one(pair, "target-only", max_tokens=10)
    assert every.token_ids == target.token_ids


def test_handoff_v3_keeps_a_near_tie_the_lossless_window_rejects():
    # target after 2: 9 with 0.5, 3 with 0.45: the draft's 3 is within (1 - 0.2) of the top, so v3 keeps it
    draft = chain({i: i + 1 for i in range(10)}, confidence={0: 0.3})

    def target(h):
        if h[-1] == 2:
            return {9: 0.5, 3: 0.45}
        return chain({i: i + 1 for i in range(10)})(h)

    c = scripted_cascade(draft, target)
    lossless = one(c, "handoff(trigger_below=0.5, window=inf, k=3)", max_tokens=4)
    lossy = one(c, "handoff-v3(alpha=0.2, trigger_below=0.5, window=inf, k=3)", max_tokens=4)
    assert lossless.token_ids[:3] == [1, 2, 9]
    assert lossy.token_ids == [1, 2, 3, 4]
