"""Per-request policy state (``cascade.policies.state``): stacking into [B] tensors and back, row selection
and writes as the replay uses them, the refusal of a field that is not a scalar, and the plans and
decisions of the policies that carry a state (``quantile``'s routing, ``target-only``'s plan)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cascade.policies import make_policy
from cascade.policies.handoff import HandoffState
from cascade.policies.routing import RoutingState
from cascade.policies.state import NoState, RoundPlan, has_fields, initial_batch, put, stack, take, unstack


@dataclass(frozen=True)
class Mixed:
    left: float = 0.0
    count: int = 0
    flag: bool = False


def test_stack_and_unstack_round_trip_each_field_with_its_dtype():
    states = [Mixed(1.5, 2, True), Mixed(0.0, 7, False), Mixed(float("inf"), -1, True)]
    batch = stack(states)
    assert batch.left.dtype == torch.float32 and batch.count.dtype == torch.int64 and batch.flag.dtype == torch.bool
    assert batch.left.tolist() == [1.5, 0.0, float("inf")] and batch.count.tolist() == [2, 7, -1]
    assert unstack(batch) == states


def test_take_and_put_select_and_write_rows():
    batch = initial_batch(make_policy("handoff"), 4)
    assert unstack(batch) == [HandoffState()] * 4
    rows = torch.tensor([1, 3])
    sub = take(batch, rows)
    put(batch, rows, HandoffState(window_left=sub.window_left + torch.tensor([5.0, 6.0])))
    assert [s.window_left for s in unstack(batch)] == [0.0, 5.0, 0.0, 6.0]


def test_a_state_field_that_is_not_a_scalar_is_refused_naming_it():
    @dataclass(frozen=True)
    class Bad:
        tokens: list = None

    with pytest.raises(TypeError, match="Bad.tokens"):
        stack([Bad()])


def test_policies_without_state_carry_nothing():
    for name in ("speculative", "chow", "bild", "draft-only"):
        p = make_policy(name)
        assert p.init_state() == NoState() and not has_fields(p.State) and p.plan(p.init_state()) == RoundPlan()
    assert make_policy("target-only").plan(NoState()) == RoundPlan(drafts=False)


def test_quantile_holds_its_answer_until_it_decides_once():
    route, keep = make_policy("quantile", tau=0.0), make_policy("quantile", tau=-10.0)
    start = route.init_state()
    assert start == RoutingState() and route.plan(start) == RoundPlan(drafts=True, holds_output=True)
    routed, again = route.at_finish(start, [-1.0, -2.0])
    assert again and routed == RoutingState(decided=True, routed=True)
    assert route.plan(routed) == RoundPlan(drafts=False, holds_output=False)  # the target's answer, streamed
    assert route.at_finish(routed, [-5.0]) == (routed, False)  # decided once: the target's answer stands
    kept, again = keep.at_finish(start, [-1.0, -2.0])
    assert not again and keep.plan(kept) == RoundPlan(drafts=True, holds_output=False)
