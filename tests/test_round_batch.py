"""The round's flat layout (``cascade.round_batch``): which rows of the flat draft and target logits each
sequence owns, and what a block's host side says about its end."""

from __future__ import annotations

import torch

from cascade.metrics import TokenSource
from cascade.round_batch import Block, DraftedBlocks, TargetLogits


def test_drafted_rows_follow_the_offsets_and_the_kept_lengths():
    blocks = [Block(tokens=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3], keep=2, escalate=True),
              Block(tokens=[8], logprobs=[-0.4], keep=1, escalate=False),
              Block(tokens=[9, 10], logprobs=[-0.5, -0.6], keep=2, escalate=True)]
    drafted = DraftedBlocks(blocks=blocks, offsets=[0, 4, 5], logits=torch.zeros(7, 3))  # 4, 1, 2 drafted
    assert drafted.escalated() == [0, 2]
    assert drafted.draft_rows(drafted.escalated()) == [0, 1, 5, 6]  # kept positions only, sequence-major
    assert blocks[1].emitted(0).source == TokenSource.DRAFT and blocks[1].emitted(0).logprob == -0.4


def test_target_rows_block_then_bonus_and_one_row_per_target_only_member():
    # members: an escalated block of 3 kept (+ bonus), one that ends the request (2 kept, no bonus), a target-only row
    target = TargetLogits(logits=torch.zeros(7, 3), starts=[0, 4, 6], counts=[4, 2, 1], positions=11)
    assert target.block_rows(0, 3) == [0, 1, 2] and target.last_row(0) == 3
    assert target.block_rows(1, 2) == [4, 5]
    assert target.last_row(2) == 6


def test_a_block_ends_the_request_only_when_all_of_it_stands():
    final = Block(tokens=[1, 2, 3], keep=3, final=True)
    assert final.ends_request
    assert not Block(tokens=[1, 2, 3], keep=2, final=True).ends_request
    assert not Block(tokens=[1, 2, 3], keep=3, final=False).ends_request
