"""The round's shared bookkeeping (``cascade.round``) on hand-made flat ragged batches."""

from __future__ import annotations

import torch

from cascade.round import accepted_counts, settle_trigger, target_layout


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
