"""``takeover`` and ``takeover-spec``: stream the draft's answer from the first token, and hand the rest of it
to the target, for good, as soon as the answer so far says the draft is out of its depth.

Why (issue 31): a request-level router (``quantile``) judges the draft's *whole* answer before it decides, so a
streamed request gets nothing until the draft has finished, and a routed one then waits for a whole target
answer on top (and pays the target's whole answer). A token-level cascade streams, but where the draft wavers all
along it pays a catch-up block by block. These policies stream like a token-level cascade and decide like a
router, early: the draft answers alone, its tokens streamed as they are decoded, while the policy accumulates the
router's evidence over the answer so far; once the evidence says the draft is out of its depth, the target
answers the rest, for good (alone, or verifying the draft's blocks losslessly: below). Tokens already streamed
are never taken back: the target continues the answer from them (one catch-up pass reads them).

The evidence is ``quantile``'s, kept as it grows: the ``quantile``-th quantile of the log-probs the draft gave its
own emitted tokens (EOS excluded, natural T = 1 log-probs: ``EmittedToken.logprob``). The lower order statistic
of ``n`` values is below ``tau`` iff more than ``floor(quantile * (n - 1))`` of them are, so two counts carry it
exactly from round to round (``TakeoverState``: tokens seen, tokens below ``tau``), whatever the answer's length.
(``quantile`` interpolates between order statistics; the lower one differs from it only between two values that
straddle ``tau``.)

When it may fire: at the end of a round in which the answer reached ``after`` emitted tokens or more, while the
answer is at most ``until`` tokens long, and at the first round end past ``after`` in any case. ``until = inf``
decides continuously; ``until = after`` decides once, at a fixed early point (the request's first ``after``
tokens are its whole evidence); a smaller ``after`` decides earlier on less evidence.

What the target does after the hand-over (two policies, as ``quantile`` / ``quantile-spec`` for the router): under
``takeover`` it decodes the rest alone (the draft stops; one catch-up pass reads the streamed prefix, then one
pass and one position per token: the fewest target FLOPs); under ``takeover-spec`` it verifies the draft's blocks
(lossless speculative decoding with the same draft, ``delta = 1``: about one pass per ``k`` tokens, the fewest
target passes, a few rejected positions more). Either way the greedy output from the hand-over on is the
target's greedy continuation of the streamed prefix.

A second, token-level entry (``trigger_below``, off at 0): a block in which some drafted position's confidence
``max q`` is below ``trigger_below`` (Chow's trigger) is escalated before it is streamed, the target verifies it
(lossless: the draft's first wrong token there is replaced by the target's), and the request is handed over from
that round on. It is the router's evidence in the one form a streaming policy can act on before the token is
out: a confidently wrong answer (the run command's pencil prompt: "$1 x 27") keeps a high log-prob quantile, and
only a single uncertain token says where it went wrong. Both entries hand over for good; ``takeover`` with
``tau = -inf`` and a ``trigger_below`` is Chow's first escalation followed by the target alone
(``handoff(window=inf)`` with the target decoding instead of verifying).

The state (``cascade.policies.state``) is three scalars per request; ``after_round`` updates it from the round's
emitted log-probs (``RoundOutcome``), in the engine and in the replay alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from cascade.policies.base import BlockConfidence, Policy, check_number, check_unit, register
from cascade.policies.state import RoundOutcome, RoundPlan


@dataclass(frozen=True)
class TakeoverState:
    """A ``takeover`` request's state between rounds."""

    seen: int = 0  # tokens the draft emitted so far (its evidence's count)
    low: int = 0  # of them, those with log-prob below tau
    handed_over: bool = False  # the target verifies every block from now on (absorbing)


def below_quantile(low: torch.Tensor, seen: torch.Tensor, quantile: float) -> torch.Tensor:
    """low, seen [B] int64 -> [B] bool: is the lower ``quantile``-th order statistic of ``seen`` values, ``low`` of
    which are below a level, itself below it (``low > floor(quantile * (seen - 1))``; False for no values)?"""
    index = torch.floor(quantile * (seen - 1).clamp_min(0).double()).long()
    return (seen > 0) & (low > index)


@dataclass(frozen=True)
class _TakeoverEvidence(Policy):
    """The evidence and the hand-over decision (fields, state, ``after_round``), shared by ``takeover`` and
    ``takeover-spec``, which differ only in what the target does after the hand-over."""

    State: ClassVar[type] = TakeoverState
    tau: float = -1.0  # log-prob level of an uncertain token, any real number or +-inf
    quantile: float = 0.1  # which quantile of the draft's token log-probs so far, in [0, 1]
    after: float = 32.0  # emitted tokens before a hand-over may fire (>= 1)
    until: float = math.inf  # no hand-over once the answer is longer (after the first chance); inf: continuously
    trigger_below: float = 0.0  # token-level entry: a block with a drafted max q below this is verified and hands
    #   the request over (0: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("tau", self.tau)
        check_unit("quantile", self.quantile)
        check_number("after", self.after, low=1.0)
        check_number("until", self.until, low=0.0)
        check_unit("trigger_below", self.trigger_below)

    def after_round(self, state: TakeoverState, outcome: RoundOutcome) -> TakeoverState:
        """Count the round's draft tokens into the evidence (until the hand-over) and hand over where it says so,
        or where the round was escalated (the token-level entry fired, or the request was handed over already)."""
        handed = state.handed_over.bool()
        fresh = outcome.emitted_mask() & ~handed.view(-1, 1)
        seen = state.seen + torch.where(handed, 0, outcome.emitted)
        low = state.low + ((outcome.logprobs < self.tau) & fresh).sum(dim=1)
        reached = seen.double() >= self.after
        first_chance = reached & (state.seen.double() < self.after)
        may_fire = ~handed & (first_chance | (reached & (seen.double() <= self.until)))
        fire = may_fire & below_quantile(low, seen, self.quantile)
        return TakeoverState(seen=seen, low=low, handed_over=handed | fire | outcome.escalated.bool())

    def enters(self, conf: BlockConfidence) -> torch.Tensor:
        """-> [B] bool: the token-level entry: some drafted position's max q is below ``trigger_below``."""
        return ((conf.max_prob < self.trigger_below) & conf.valid).any(dim=1)


@register("takeover")
@dataclass(frozen=True)
class Takeover(_TakeoverEvidence):
    """Stream the draft's answer; once the ``quantile``-th quantile of its token log-probs so far falls below
    ``tau`` (decided at round ends from ``after`` emitted tokens on, while the answer is at most ``until``
    tokens), or a block has a position less confident than ``trigger_below`` (that block verified first), the
    target decodes the rest of the answer alone, one pass per token. See the module docstring."""

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft alone, but for the token-level entry's block (a handed-over request no longer drafts:
        ``plan``)."""
        return conf.drafted.clone(), self.enters(conf)

    def plan(self, state: TakeoverState) -> RoundPlan:
        """Streamed from the first round; the target alone from the hand-over on."""
        return RoundPlan(drafts=not state.handed_over)


@register("takeover-spec")
@dataclass(frozen=True)
class TakeoverSpec(_TakeoverEvidence):
    """``takeover`` whose target, after the hand-over, verifies the draft's blocks (lossless speculative decoding,
    ``delta = 1``) instead of decoding alone. See the module docstring."""

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft alone until the hand-over (or the token-level entry's block), then escalate every block."""
        handed = conf.state.handed_over.to(conf.drafted.device) if conf.state is not None \
            else torch.zeros_like(conf.drafted, dtype=torch.bool)
        return conf.drafted.clone(), handed | self.enters(conf)
