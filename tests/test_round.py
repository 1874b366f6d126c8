"""The round's shared bookkeeping (``cascade.round``) on hand-made flat ragged batches."""

from __future__ import annotations

import torch

from cascade.policies import make_policy
from cascade.policies.state import RoundOutcome, stack, unstack
from cascade.round import (
    PolicyGroup,
    accepted_counts,
    block_lengths,
    draft_cache_keeps,
    drafting_stops,
    first_true,
    next_states,
    run_triggers,
    settle_trigger,
    target_layout,
)


def test_accepted_counts_over_flat_ragged_rows():
    keep = torch.tensor([3, 0, 2, 4])
    accept = torch.tensor([1.0, 1.0, 0.0,   0.5, 0.5,   1.0, 1.0, 1.0, 1.0])
    u = torch.tensor([0.3, 0.9, 0.1,        0.4, 0.6,   0.0, 0.5, 0.99, 0.2])
    # seq 0: rejects at row 2; seq 1: empty; seq 2: 0.4 < 0.5 accepted, 0.6 rejected; seq 3: all accepted
    assert accepted_counts(accept, u, keep).tolist() == [2, 0, 1, 4]
    assert accepted_counts(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long)).tolist() == []
    assert accepted_counts(torch.zeros(2), torch.zeros(2), torch.tensor([2])).tolist() == [0]  # u >= 0 rejects p = 0


def test_settle_trigger_and_target_layout():
    keep, esc = settle_trigger(torch.tensor([5, 0, 2, -1]), torch.tensor([False, False, True, False]), torch.tensor([3, 2, 2, 4]))
    assert keep.tolist() == [3, 0, 2, 0] and esc.tolist() == [False, True, True, True]
    fed, num_logits = target_layout(torch.tensor([3, 3, 0]), torch.tensor([False, True, False]))
    assert fed.tolist() == [3, 2, 0] and num_logits.tolist() == [4, 3, 1]  # target-only: nothing fed, one scored


# ------------------------------------------------------------------ the policy-dependent steps, by group
def _conf(max_prob, drafted, catch_up=None):
    from cascade.policies import BlockConfidence

    m = torch.tensor(max_prob, dtype=torch.float32)
    B, K = m.shape
    valid = torch.arange(K).view(1, K) < torch.tensor(drafted).view(B, 1)
    return BlockConfidence(max_prob=m, margin=m, entropy=torch.zeros(B, K), token_logprob=m.clamp_min(1e-30).log(),
                           valid=valid, drafted=torch.tensor(drafted),
                           catch_up=None if catch_up is None else torch.tensor(catch_up))


def test_block_lengths_end_at_the_first_cut_and_never_past_what_was_drafted():
    cut = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert block_lengths(cut, torch.tensor([3, 2, 3])).tolist() == [2, 2, 1]
    assert first_true(cut, torch.tensor([9, 9, 9])).tolist() == [1, 9, 0]


def test_drafting_stops_ask_only_the_policies_that_stop_early_each_on_its_rows():
    bild, chow = make_policy("bild", fallback=0.5), make_policy("chow", alpha=0.5)
    max_prob = torch.tensor([[0.9, 0.4, 0.9], [0.9, 0.4, 0.9], [0.3, 0.9, 0.9]])
    stops = drafting_stops(max_prob, [PolicyGroup(bild, torch.tensor([0, 2])), PolicyGroup(chow, torch.tensor([1]))])
    assert stops.tolist() == [[False, True, False], [False, False, False], [True, False, False]]
    # one group of every row (index None) gives the same rows as the grouped call
    assert drafting_stops(max_prob, [PolicyGroup(bild)])[[0, 2]].tolist() == stops[[0, 2]].tolist()


def test_run_triggers_applies_each_policy_to_its_own_rows_with_its_own_state():
    from cascade.policies.handoff import HandoffState

    conf = _conf([[0.9, 0.4], [0.9, 0.9], [0.9, 0.9], [0.2, 0.9]], [2, 2, 2, 1])
    handoff, draft_only = make_policy("handoff", trigger_below=0.5, window=8.0), make_policy("draft-only")
    state = stack([HandoffState(0.0), HandoffState(3.0)])  # rows 0 and 2: outside / inside a window
    keep, esc = run_triggers(conf, [PolicyGroup(handoff, torch.tensor([0, 2]), state),
                                    PolicyGroup(draft_only, torch.tensor([1, 3]))])
    assert keep.tolist() == [2, 2, 2, 1]
    assert esc.tolist() == [True, False, True, False]  # uncertain / draft-only / inside a window / draft-only
    # settled: a trigger that keeps nothing escalates (chow-cut cuts before its first uncertain position)
    keep, esc = run_triggers(conf, [PolicyGroup(make_policy("chow-cut", alpha=0.5))])
    assert keep.tolist() == [1, 2, 2, 0] and esc.tolist() == [True, False, False, True]


def test_next_states_update_only_the_groups_that_keep_one():
    from cascade.policies.handoff import HandoffState

    handoff = make_policy("handoff", window=8.0)
    groups = [PolicyGroup(handoff, torch.tensor([0, 2]), stack([HandoffState(0.0), HandoffState(5.0)])),
              PolicyGroup(make_policy("speculative"), torch.tensor([1]))]
    after = next_states(groups, RoundOutcome(torch.tensor([True, True, True]), torch.tensor([3, 4, 2]), torch.zeros(3, 4)))
    assert after[1] is None and [s.window_left for s in unstack(after[0])] == [5.0, 3.0]


def test_the_draft_cache_keeps_what_stands_but_never_the_last_emitted_token():
    """After a commit the draft is fed ``emitted - keeps`` tokens: 2 after a fully accepted escalated block
    (d_n and the bonus), 1 after a rejection or a block kept as drafted; a block cut short by an early stop
    keeps what its decode steps were fed. Ints (the engine's commit) and tensors (the replay) agree."""
    cases = [  # (fed, kept, emitted) -> keeps
        ((4, 5, 6), 4),  # k = 5 escalated, all 5 accepted + bonus: lag 2
        ((4, 2, 3), 2),  # rejection at 3: 2 accepted + the replacement: lag 1
        ((4, 5, 5), 4),  # kept as drafted, not escalated: lag 1
        ((4, 3, 3), 2),  # kept a prefix without escalating: lag 1
        ((4, 2, 3), 2),  # an early stop at 3 of 5, the 2 before it accepted + bonus: lag 1
        ((4, 0, 1), 0),  # nothing accepted: only the replacement, fed next round
    ]
    for (fed, kept, emitted), want in cases:
        assert draft_cache_keeps(fed, kept, emitted) == want
    fed, kept, emitted = (torch.tensor(v) for v in zip(*(c for c, _ in cases)))
    assert draft_cache_keeps(fed, kept, emitted).tolist() == [w for _, w in cases]
