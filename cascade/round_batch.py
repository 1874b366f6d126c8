"""The one object a round's stages pass along (``Engine.step``): the plan, then what each stage adds, laid out
flat with per-sequence offsets (as vLLM v1's ``SpecDecodeMetadata`` lays out a speculative batch).

- ``RoundBatch``: the round's plan (``Engine._plan``: who drafts and at what block length, who the target
  decodes alone) and, as the stages run, their results: ``blocks`` (the draft stage), ``target`` (the target
  pass), ``verdicts`` and ``sampled`` (verification). Stages read the fields before theirs, write their own.
- ``DraftedBlocks``: every cascading sequence's settled block. Sequence ``i`` (of ``RoundBatch.cascading``)
  drafted flat rows ``offsets[i] .. offsets[i] + drafted[i]`` of ``logits`` [N, V] (the filtered draft
  logits its tokens were drawn from, on the device); ``blocks[i]`` (``Block``) holds its host side: the settled
  tokens, their log-probs, what the trigger kept and whether it escalates.
- ``TargetLogits``: the target pass's logits, flat: member ``m`` (the escalated sequences, then the target-only
  ones) owns rows ``starts[m] .. starts[m] + counts[m]``: its kept block's positions, then its bonus position
  (none after a block that ends the request); one row for a target-only sequence.

Verification (``cascade.acceptance``) gathers its rows from these by index (``draft_rows``, ``target_rows``,
``bonus_rows``): one ``index_select`` per tensor, no per-sequence slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cascade.metrics import EmittedToken, TokenSource
from cascade.scheduler import Sequence
from cascade.speculation import RoundClock

if TYPE_CHECKING:
    from cascade.acceptance import Verdict


@dataclass
class Block:
    """The host side of one sequence's drafted block within the current round (its draft logits are rows
    of ``DraftedBlocks.logits``)."""

    tokens: list[int]  # drafted tokens d_1..d_n of the settled block
    logprobs: list[float] = field(default_factory=list)  # natural log q(d_j)
    final: bool = False  # the last drafted token ends the request (EOS, stop string, max_tokens)
    keep: int = 0  # block length chosen by the trigger
    escalate: bool = False
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per drafted token when the request
    #   asks for top log-probs: the draft's most likely tokens (id, natural log-prob)

    def emitted(self, j: int) -> EmittedToken:
        """Drafted token j as emitted by the draft (not verified)."""
        return EmittedToken(self.tokens[j], TokenSource.DRAFT, self.logprobs[j], tuple(self.top[j]) if self.top else ())

    @property
    def ends_request(self) -> bool:
        """The kept block ends the request if all of it is accepted (no bonus token follows it)."""
        return self.final and self.keep == len(self.tokens)


@dataclass
class DraftedBlocks:
    """The draft stage's output, flat (see the module docstring)."""

    blocks: list[Block]  # [B] per cascading sequence, in the batch's order
    offsets: list[int]  # [B] the first flat row of each sequence's drafted positions
    logits: torch.Tensor  # [N, V] float32 filtered draft logits of every drafted position, device

    def escalated(self) -> list[int]:
        """Indices of the sequences whose kept block goes to the target."""
        return [i for i, b in enumerate(self.blocks) if b.escalate]

    def draft_rows(self, members: list[int]) -> list[int]:
        """Flat rows of ``logits`` holding the kept positions of ``members``' blocks, sequence-major."""
        return [self.offsets[i] + j for i in members for j in range(self.blocks[i].keep)]


@dataclass
class TargetLogits:
    """The target pass's output, flat (see the module docstring)."""

    logits: torch.Tensor  # [M, V] the cut logits of every scored position, device
    starts: list[int]  # [members] each member's first row
    counts: list[int]  # [members] rows each member scored
    positions: int  # positions the pass processed (fed tokens, prefill included), for the speed model

    def block_rows(self, m: int, keep: int) -> list[int]:
        """Rows of escalated member ``m``'s first ``keep`` block positions."""
        return list(range(self.starts[m], self.starts[m] + keep))

    def last_row(self, m: int) -> int:
        """Member ``m``'s last scored row (its bonus position, or a target-only sequence's one row)."""
        return self.starts[m] + self.counts[m] - 1


@dataclass
class RoundBatch:
    """One round over the running batch: its plan (``Engine._plan``), then each stage's output."""

    running: list[Sequence]  # every sequence this round reports on (finished ones included)
    cascading: list[Sequence]  # those the draft proposes a block for
    target_only: list[Sequence]  # those the target decodes one token for, alone
    lossless: list[Sequence]  # cascading lossless ones, when dynamic speculation chooses their k
    moved: list[Sequence]  # lossless ones the target decodes alone this round (dynamic k = 0)
    k_round: int | None  # dynamic speculation's block length this round (None: off)
    ks: list[int]  # block length of each cascading sequence
    draft_fed: int  # pending tokens the draft's first pass feeds
    clock: RoundClock | None  # stage timestamps, for dynamic speculation
    size: int  # unfinished sequences at the start of the round
    blocks: DraftedBlocks | None = None  # 2-4: the settled blocks (None: nothing drafted)
    escalated: list[int] = field(default_factory=list)  # 5: indices into ``cascading`` whose block goes to the target
    target: TargetLogits | None = None  # 5: the target pass (None: it did not run)
    verdicts: dict[int, "Verdict"] = field(default_factory=dict)  # 6: per escalated index, what verification decided
    sampled: list[torch.Tensor] = field(default_factory=list)  # 6: host [tokens, log-probs, (top)] of target-only ones

    def mark(self, stage: str) -> None:
        if self.clock is not None:
            self.clock.mark(stage)

    def escalated_seqs(self) -> list[Sequence]:
        return [self.cascading[i] for i in self.escalated]
