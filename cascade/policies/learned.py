"""``learned``: the hand-off window opened by the learned deferral router instead of by max q.

The router (``cascade.router``) scores every drafted position with P(the target's greedy token differs
from the draft's), from the confidence kernel's statistics, in one batched matmul per round; the engine
puts the scores in ``BlockConfidence.router``. A block opens a window when some drafted position scores
``>= threshold`` and, with ``price > 0``, when the block's expected disagreements (the scores summed)
reach ``price`` times the target positions escalating it costs now (catch-up + block + bonus). Inside
the window every block is verified losslessly, exactly as in ``handoff`` (``window = 0``: the entry block
alone; ``inf``: to the end of the request).

The engine refuses the policy when no router is loaded (``cascade train-router`` writes one next to the
converted draft; ``Cascade.from_pretrained`` loads it from there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cascade.policies.base import BlockConfidence, Policy, check_unit, register
from cascade.policies.handoff import _HandoffWindow, worth_its_cost


@register("learned")
@dataclass(frozen=True)
class Learned(_HandoffWindow, Policy):
    """Open a lossless verification window where the learned router expects the target to disagree. See
    the module docstring."""

    uses_router: ClassVar[bool] = True
    threshold: float = 0.5  # P(target disagrees) at a drafted position that opens a window
    price: float = 0.0  # cost-aware entry: expected disagreements >= price x target positions paid
    window: float = 0.0  # emitted tokens per window (0: the entry block alone; inf: to the end)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit("threshold", self.threshold)
        self._check_handoff()

    def opens_window(self, conf: BlockConfidence) -> torch.Tensor:
        if conf.router is None:
            raise ValueError("policy: learned needs the router's scores (load a router: `cascade train-router`)")
        score = conf.router.float().to(conf.valid.device)
        likely = ((score >= self.threshold) & conf.valid).any(dim=1)
        return likely & worth_its_cost(conf, score, self.price)
