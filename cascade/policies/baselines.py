"""The three baselines every cascade is measured against: lossless speculative decoding, the draft
alone and the target alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cascade.policies.base import BlockConfidence, Policy, register
from cascade.policies.state import RoundPlan


@register("speculative")
@dataclass(frozen=True)
class Speculative(Policy):
    """Lossless speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
    Speculative Decoding"): every block is escalated and verified with delta = 1 (pi = p), so the output
    distribution is exactly the target's; greedy output equals target-only greedy output."""

    lossless: ClassVar[bool] = True


@register("draft-only")
@dataclass(frozen=True)
class DraftOnly(Policy):
    """Baseline: the draft answers alone; the target never runs (no escalation, every token DRAFT)."""

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        return conf.drafted.clone(), torch.zeros_like(conf.drafted, dtype=torch.bool)


@register("target-only")
@dataclass(frozen=True)
class TargetOnly(Policy):
    """Baseline: the target decodes every token itself; the draft never runs (``k`` is ignored)."""

    def plan(self, state) -> RoundPlan:
        return RoundPlan(drafts=False)
