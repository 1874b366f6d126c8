"""Hand-off: escalate once, then let the target verify a whole window of blocks, then hand back.

Why (issue 13): a per-token trigger escalates in scattered places, and each late escalation makes the
target catch up on everything the draft wrote since the target last ran. ``handoff`` pays that catch-up
once per window instead of once per uncertain token: the first block with an uncertain position is
escalated, and from then on every block is verified (speculative decoding with the same draft, lossless:
``delta = 1``) until ``window`` tokens have been emitted; then the draft runs alone again and the next
uncertain position opens a new window.

The entry test has two knobs, one of them cost-aware:

- ``trigger_below``: a block can open a window only if some drafted position has ``max q <
  trigger_below`` (Chow's trigger; 1 = any block);
- ``price``: ... and only if the block's expected draft errors, ``sum_j (1 - max q_j)`` over its drafted
  positions, reach ``price`` times the target positions escalating now costs (``catch_up + drafted + 1``:
  the tokens the target has not read yet, the block, the bonus position). The longer the target has been
  away, the more evidence an escalation needs. ``price = 0`` is the plain threshold.

``window`` counts emitted tokens from the start of the entry block; ``window = 0`` verifies the entry
block alone (a cost-aware Chow trigger with lossless verification), ``window = inf`` keeps the request
escalated to the end (speculative decoding from the first uncertain token on).

``handoff-v3`` is the same hand-off with ``token-v3``'s lossy rule inside the window (Speculative
Cascades' token-specific variant 3, ``alpha``): a drafted token the target finds within a factor
``1 - alpha`` of its own top probability is kept, so a window accepts more of the draft.

What a request carries between rounds is the policy's state, ``HandoffState.window_left`` (the tokens left
in its window; ``cascade.policies.state``): the trigger reads it back as ``conf.state`` and ``after_round``
updates it; ``conf.catch_up`` is computed per round. The engine and the replay
(``cascade.bench.replay.simulate_paths``) keep it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cascade.policies.base import BlockConfidence, Policy, check_number, check_unit, register
from cascade.policies.speculative_cascades import TokenV3
from cascade.policies.state import RoundOutcome


def worth_its_cost(conf: BlockConfidence, error_prob: torch.Tensor, price: float) -> torch.Tensor:
    """-> [B] bool: the block's expected draft errors (``error_prob`` [B, K] summed over the drafted positions)
    reach ``price`` times the target positions escalating it now costs (catch-up + block + bonus)."""
    if price <= 0.0:
        return torch.ones_like(conf.drafted, dtype=torch.bool)
    catch_up = conf.catch_up_tokens()
    expected_errors = torch.where(conf.valid, error_prob.float(), 0.0).sum(dim=1)  # [B]
    paid = (catch_up + conf.drafted + 1).float()  # [B] target positions this escalation costs
    return expected_errors >= price * paid


def handoff_entry(conf: BlockConfidence, trigger_below: float, price: float) -> torch.Tensor:
    """-> [B] bool: does this block open a window (see the module docstring)? Error probability of a
    position: 1 - max q."""
    uncertain = ((conf.max_prob < trigger_below) & conf.valid).any(dim=1) | torch.full_like(
        conf.drafted, trigger_below >= 1.0, dtype=torch.bool)
    return uncertain & worth_its_cost(conf, 1.0 - conf.max_prob.float(), price)


@dataclass(frozen=True)
class HandoffState:
    """A hand-off request's state between rounds."""

    window_left: float = 0.0  # emitted tokens left in its verification window (0: outside a window)


@dataclass(frozen=True)
class _HandoffWindow:
    """The hand-off trigger and window bookkeeping, shared by ``handoff``, ``handoff-v3`` and ``learned``. A
    mixin: its fields come after the rule's own in each registered class."""

    State: ClassVar[type] = HandoffState

    def _check_handoff(self) -> None:
        """The window's and the cost-aware entry's fields (each class checks its own entry threshold)."""
        check_number("price", self.price, low=0.0)
        check_number("window", self.window, low=0.0)

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        window_left = conf.state.window_left if conf.state is not None else torch.zeros(conf.drafted.shape)
        escalate = (window_left.to(conf.drafted.device) > 0) | self.opens_window(conf)
        return conf.drafted.clone(), escalate

    def opens_window(self, conf: BlockConfidence) -> torch.Tensor:
        """-> [B] bool: the entry test (Chow's threshold and the cost-aware price by default)."""
        return handoff_entry(conf, self.trigger_below, self.price)

    def after_round(self, state: HandoffState, outcome: RoundOutcome) -> HandoffState:
        """Inside a window: what is left of it after this round's tokens; an escalation outside one opens a
        window of ``window`` tokens, the entry block's tokens counted; no escalation: no window."""
        escalated, emitted = outcome.escalated, outcome.emitted
        window_left = state.window_left.float()
        start = torch.where(window_left > 0, window_left, torch.full_like(window_left, self.window))
        left = (start - emitted.float()).clamp_min(0.0)
        return HandoffState(window_left=torch.where(escalated, left, torch.zeros_like(window_left)))


@register("handoff")
@dataclass(frozen=True)
class Handoff(_HandoffWindow, Policy):
    """Escalate at the first uncertain block (``trigger_below``, cost-aware with ``price``), then verify
    every block losslessly (speculative decoding) for ``window`` tokens, then hand back to the draft. See
    the module docstring."""

    trigger_below: float = 0.5  # a block may open a window when a drafted max q is below this
    price: float = 0.0  # cost-aware entry: expected draft errors >= price x target positions paid
    window: float = 32.0  # emitted tokens per window (0: the entry block alone; inf: to the end)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit("trigger_below", self.trigger_below)
        self._check_handoff()


@register("handoff-v3")
@dataclass(frozen=True)
class HandoffV3(_HandoffWindow, TokenV3):
    """``handoff`` with ``token-v3``'s lossy rule (``alpha``) inside the window instead of lossless
    verification. See the module docstring."""

    trigger_below: float = 0.5
    price: float = 0.0
    window: float = 32.0

    def __post_init__(self) -> None:
        super().__post_init__()  # (TokenV3 checks alpha and trigger_below)
        self._check_handoff()

