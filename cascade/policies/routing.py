"""Request-level policies: the whole request goes to one model (routing), instead of spans of it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from cascade.policies.base import (
    BlockConfidence,
    Policy,
    check_number,
    check_unit,
    register,
)
from cascade.policies.state import RoundPlan


@dataclass(frozen=True)
class RoutingState:
    """A request-level request's state: has its policy decided, and did it send the request to the target?"""

    decided: bool = False  # the draft's answer ended and was judged (until then it is held back)
    routed: bool = False  # the draft's answer was discarded: the target answers from the prompt


def linear_quantile(values: Sequence[float], level: float) -> float:
    """The ``level`` quantile with linear interpolation between order statistics (numpy's and
    torch.quantile's default); 0.0 for no values."""
    xs = sorted(values)
    if not xs:
        return 0.0
    pos = level * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@register("quantile")
@dataclass(frozen=True)
class Quantile(Policy):
    """Request-level cascade on a quantile of the draft's token log-probs (Gupta, Narasimhan, Jitkrittum,
    Rawat, Menon, Kumar, "Language Model Cascades: Token-level uncertainty and beyond", ICLR 2024, arXiv
    2404.10136: quantiles of per-token uncertainty as the deferral score of a sequence-level cascade).

    The draft answers the whole request alone (no escalation; ``k`` is its block length per round). When
    it finishes (EOS, stop string or max_tokens), score = the ``quantile``-th quantile (linear
    interpolation) of the natural (T = 1) log-probs the draft gave its own emitted tokens (EOS excluded;
    an empty answer scores 0). If score < ``tau`` the draft's answer is discarded and the target answers
    from scratch, decoding alone from the prompt; otherwise the draft's answer stands.

    The engine holds the draft's answer back (empty deltas, text "") until the decision, so a streamed
    request gets a kept draft answer whole in the round it finished, and an escalated one the target's
    tokens as they are decoded. Stats keep the discarded draft work (draft tokens) and add the target's,
    and ``routed_to_target`` records the decision.

    quantile = 0 is the least confident token (one token decides: long answers almost always contain a
    few uncertain wording choices), 0.5 the median (averages away the few tokens an answer hinges on); the
    default 0.1 looks at the least confident tenth. tau = -inf never escalates (draft-only), tau = +inf
    always does (target-only, after paying for the draft's answer). tau = -1 (token probability e^-1) is a
    starting point; calibrate it on a dev set for a target-token budget."""

    request_level: ClassVar[bool] = True
    State: ClassVar[type] = RoutingState
    tau: float = -1.0  # log-prob threshold, any real number or +-inf
    quantile: float = 0.1  # which quantile of the draft's token log-probs, in [0, 1]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("tau", self.tau)
        check_unit("quantile", self.quantile)

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        return conf.drafted.clone(), torch.zeros_like(conf.drafted, dtype=torch.bool)

    def score(self, token_logprobs: Sequence[float]) -> float:
        return linear_quantile(token_logprobs, self.quantile)

    def route_to_target(self, token_logprobs: Sequence[float]) -> bool:
        return self.score(token_logprobs) < self.tau

    def plan(self, state: RoutingState) -> RoundPlan:
        """The draft answers, held back, until the decision; a routed request is the target's, streamed."""
        return RoundPlan(drafts=not state.routed, holds_output=not state.decided)

    def at_finish(self, state: RoutingState, token_logprobs: Sequence[float]) -> tuple[RoutingState, bool]:
        """The draft's answer ended: route it (answer again with the target) or keep it; decided once."""
        if state.decided:
            return state, False
        routed = self.route_to_target(token_logprobs)
        return RoutingState(decided=True, routed=routed), routed


@register("oracle")
@dataclass(frozen=True)
class Oracle(Policy):
    """Benchmark-only upper bound of request-level routing: per request, the cheaper of the draft-only and
    the target-only answer that is correct (the draft's when both are or neither is). It needs the
    reference answer, so the benchmark harness derives it from the two baseline runs; the engine refuses
    it (``Engine.add_request`` raises ValueError)."""

    benchmark_only: ClassVar[bool] = True
