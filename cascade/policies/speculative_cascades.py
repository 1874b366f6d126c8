"""Deferral rules from Speculative Cascades: Narasimhan, Jitkrittum, Rawat, Kim, Gupta, Menon, Kumar,
"Faster Cascades via Speculative Decoding", ICLR 2025 (arXiv 2405.19261).

A speculative cascade verifies a drafted block against a target distribution ``pi`` built from the draft
``q`` and the target ``p`` by a deferral rule, instead of against ``p`` itself; accepting with
``min(1, pi(x) / q(x))`` and resampling from ``norm(max(0, pi - q))`` outputs exactly ``pi``. ``chow``,
``diff`` and ``opt`` defer whole positions (``pi = (1 - delta) q + delta p``); ``token-v1..v3`` defer per
token and need the full distributions (``needs_distributions``).

Notation, per verified position, following the authors' notebook (``speculative_cascades_gemma.ipynb``
in google-research, ``sample_next_token``): ``max q`` / ``max p`` and the token rules' sets ``A`` read the
T = 1 probabilities ``softmax(logits)`` (the notebook's ``probs_*_unscaled``); ``TV(p, q) =
sum_v max(0, p(v) - q(v))`` is taken between the *sampling* distributions (``softmax(logits / T)``, the
one-hot at the argmax on greedy rows, so a greedy TV is 1[argmax p != argmax q]), and so are ``pi``, the
acceptance ratio and the residual.

Trigger and rule are separate. The notebook runs the large model at every step and applies the rule
there ("lossy speculative verification"); an engine that wants to skip the target needs a draft-only
test first. ``chow`` / ``chow-cut`` use their own threshold for both (exact: a block the trigger leaves
alone has ``delta = 0`` everywhere). ``diff``, ``opt`` and ``token-v1..v3`` take a separate ``trigger``:
a block is escalated when any drafted position has ``max q < trigger``; ``trigger = 1`` (the default)
escalates every block, the paper's setting. Positions of a block that is not escalated are emitted as
drafted, i.e. with ``delta = 0``.

The bonus token: after an escalated block whose every token was kept, the engine emits one token drawn
from ``p`` at the next position, whatever the rule would say there. The target computed that
distribution in the same pass, so the token is free; it is the target's prediction, so it can only move
the output towards the target. It does make the output depend on ``k`` (the bonus lands at a different
position for a different block length); the notebook drafts one token per step and has no bonus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from cascade.policies.base import (
    BlockConfidence,
    Policy,
    VerifyDistributions,
    check_unit,
    register,
)


def chow_trigger(conf: BlockConfidence, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the whole block; escalate it if any drafted position has max q < threshold (every block for a
    threshold >= 1)."""
    low = (conf.max_prob < threshold) & conf.valid
    escalate = low.any(dim=1) | torch.full_like(conf.drafted, threshold >= 1.0, dtype=torch.bool)
    return conf.drafted.clone(), escalate

if TYPE_CHECKING:
    from cascade.verification import VerifyStats


@dataclass(frozen=True)
class _ChowTriggered(Policy):
    """Chow's parameter, for trigger and rule alike: escalate a block if any drafted position has
    max q < 1 - alpha."""

    alpha: float = 0.1  # 0.1: escalate blocks with a position below 90 % draft confidence

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit("alpha", self.alpha)

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        return chow_trigger(conf, 1.0 - self.alpha)


@dataclass(frozen=True)
class _RuleWithTrigger(Policy):
    """A rule parameter ``alpha`` and its own draft-only ``trigger`` (escalate a block when any drafted
    max q < trigger; 1 = verify every block, the paper's lossy speculative cascade)."""

    alpha: float = 0.1  # the rule's own threshold (see each rule)
    trigger_below: float = 1.0  # escalate a block when a drafted max q is below this; 1 = every block

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit("alpha", self.alpha)
        check_unit("trigger_below", self.trigger_below)

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        return chow_trigger(conf, self.trigger_below)


@register("chow")
@dataclass(frozen=True)
class Chow(_ChowTriggered):
    """Chow's rule as a speculative cascade (Speculative Cascades, the confidence-based deferral baseline).

    trigger: escalate the block if any drafted position has max q < 1 - alpha.
    deferral: delta = 1[max q < 1 - alpha] per verified position, so confident draft tokens are kept as
    they are (pi = q) and unconfident ones are checked against the target (pi = p). The trigger is exact:
    a block it leaves alone would have delta = 0 everywhere.
    alpha = 0 escalates everything that is not certain (lossless but for certain positions); alpha = 1
    never escalates."""

    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        return (v.max_q < 1.0 - self.alpha).float()


@register("chow-cut")
@dataclass(frozen=True)
class ChowCut(_ChowTriggered):
    """Chow's rule one position at a time, with the cheapest trigger for it (ours): drafting stops at the
    first token with max q < 1 - alpha, the block is cut just before it and escalated, and the target
    decides that one position (it is the escalation's bonus position, a draw from p). Nothing else is
    scored.

    What it outputs: at every position, given the prefix, a token distributed as Chow's pi there (q where
    max q >= 1 - alpha, p where not): the confident positions are the draft's own draws, the unconfident
    ones the target's. That is the authors' notebook's Chow cascade (one draft token per step, no bonus)
    exactly. It is NOT token for token the engine's ``chow(k)``: that one also emits a free bonus token
    from p after each escalated block whose tokens were all kept, at a position the draft may have been
    confident about (see the module docstring), so its output depends on k and chow-cut's does not.
    The target scores one position per unconfident token instead of k + 1 per escalated block.
    alpha = 1 never escalates; alpha = 0 sends every uncertain token to the target."""

    stops_drafting: ClassVar[bool] = True

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        low = (conf.max_prob < 1.0 - self.alpha) & conf.valid
        escalate = low.any(dim=1)
        first_low = torch.where(escalate, low.float().argmax(dim=1), conf.drafted)
        return first_low.to(torch.int64), escalate

    def stop_drafting(self, max_prob: torch.Tensor) -> torch.Tensor:
        return max_prob < 1.0 - self.alpha

    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        return (v.max_q < 1.0 - self.alpha).float()


@register("diff")
@dataclass(frozen=True)
class Diff(_RuleWithTrigger):
    """The "Diff" rule of Speculative Cascades: defer where the target is more confident than the draft
    by more than alpha.

    deferral: delta = 1[max q < max p - alpha] per verified position (T = 1 max probs).
    trigger: any drafted max q < ``trigger_below`` (1: every block, the paper's setting). With
    trigger_below <= 1 - alpha it is an exact pre-filter: max p <= 1, so max q >= 1 - alpha implies
    delta = 0 at every position of a block the trigger leaves alone."""

    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        return (v.max_q < v.max_p - self.alpha).float()


@register("opt")
@dataclass(frozen=True)
class Opt(_RuleWithTrigger):
    """The "OPT" rule of Speculative Cascades: the paper's plug-in approximation of its optimal deferral
    rule for speculative cascades, which charges a deferral by the rejection rate it causes.

    deferral: delta = 1[max q < max p - alpha * TV(p, q)] per verified position (alpha: the cost of a
    rejection relative to the quality gain; alpha = 0 reduces to "defer whenever the target is more
    confident").
    TV is between the sampling distributions, as in the authors' notebook: on a greedy row it is
    1[argmax p != argmax q], so greedy OPT defers exactly where Diff does whenever the models disagree
    (where they agree the choice of delta does not change the output).
    trigger: any drafted max q < ``trigger_below`` (1: every block, the paper's setting); a proxy for this
    rule at any value below 1."""

    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        return (v.max_q < v.max_p - self.alpha * v.tv).float()


@dataclass(frozen=True)
class _TokenSpecific(_RuleWithTrigger):
    """Token-specific speculative cascade (the paper's token-level deferral).

    Instead of deferring a whole position, the rule defers individual tokens: an accepted set ``A`` of
    tokens the draft may keep is defined per position (by each variant), and

        pi(v) = q(v) * 1[v in A]  +  p(v) * sum_{v' not in A} q(v')

    i.e. "draw v from q; keep it if it is in A, otherwise draw from p instead". Verification accepts
    the draft token x with min(1, pi(x) / q(x)) (1 when x is in A) and replaces the first rejected one with
    a draw from norm(max(0, pi - q)). ``A`` is computed from the rule distributions (T = 1 on greedy rows),
    ``pi`` from the sampling distributions (one-hot on greedy rows, so a greedy row keeps x if x is in A
    and otherwise emits argmax p unless x is argmax p).
    trigger: any drafted max q < ``trigger_below`` (1: every block, the paper's setting); below 1 a proxy
    for these rules (x can fall outside A at a confident position). Kept tokens are labelled DRAFT when
    x is in A and VERIFIED otherwise."""

    needs_distributions: ClassVar[bool] = True

    def accepted(self, q_rule: torch.Tensor, p_rule: torch.Tensor) -> torch.Tensor:
        """[R, V] rule distributions -> [R, V] bool membership of A."""
        raise NotImplementedError

    def _x_in_a(self, q_x: torch.Tensor, p_x: torch.Tensor, max_p: torch.Tensor) -> torch.Tensor:
        """The same membership test for the draft token only: q_x, p_x, max_p [R] -> [R] bool."""
        raise NotImplementedError

    def target_distribution(self, d: VerifyDistributions, v: "VerifyStats") -> tuple[torch.Tensor, torch.Tensor]:
        a = self.accepted(d.q_rule, d.p_rule)
        eta = (d.q * (~a)).sum(dim=-1, keepdim=True)  # draft mass the rule sends to the target
        pi = d.q * a + eta * d.p
        deferred = (~a.gather(1, d.tokens.view(-1, 1))).squeeze(1).float()
        return pi, deferred

    # The fused statistics decide membership of x alone (q_rule(x) is max q on a greedy row, where x is
    # the draft's argmax, and q(x) on a sampled row; p_rule(x) = exp(logp_token)). With them acceptance is
    # exact on greedy rows with the base acceptance 1 - r + r min(1, p(x) / q(x)) (eta = 1 there when x is
    # not in A); on sampled rows it would need eta, so the engine always takes the target_distribution
    # path. The replay harness uses deferral + acceptance on greedy rows.
    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        q_x = torch.where(v.q_token >= 1.0, v.max_q, v.q_token)
        return (~self._x_in_a(q_x, v.logp_token.exp(), v.max_p)).float()


@register("token-v1")
@dataclass(frozen=True)
class TokenV1(_TokenSpecific):
    """Token-specific speculative cascade, variant 1 (Speculative Cascades, token-specific rules).

    A = {v : q(v) >= max p - alpha}: a token is deferred when the draft's own probability of it falls more
    than alpha below the target's top probability (the Diff rule with max q replaced by q(v)).
    pi(v) = q(v) 1[v in A] + p(v) sum_{v' not in A} q(v'); see the shared class docstring."""

    def accepted(self, q_rule: torch.Tensor, p_rule: torch.Tensor) -> torch.Tensor:
        return q_rule >= p_rule.max(dim=-1, keepdim=True).values - self.alpha

    def _x_in_a(self, q_x, p_x, max_p):
        return q_x >= max_p - self.alpha


@register("token-v2")
@dataclass(frozen=True)
class TokenV2(_TokenSpecific):
    """Token-specific speculative cascade, variant 2 (Speculative Cascades, token-specific rules).

    A = {v : p(v) >= max p - alpha}: the draft may keep a token whose target probability is within alpha
    (absolute) of the target's top probability; the target's argmax is always in A.
    pi(v) = q(v) 1[v in A] + p(v) sum_{v' not in A} q(v'); see the shared class docstring."""

    def accepted(self, q_rule: torch.Tensor, p_rule: torch.Tensor) -> torch.Tensor:
        return p_rule >= p_rule.max(dim=-1, keepdim=True).values - self.alpha

    def _x_in_a(self, q_x, p_x, max_p):
        return p_x >= max_p - self.alpha


@register("token-v3")
@dataclass(frozen=True)
class TokenV3(_TokenSpecific):
    """Token-specific speculative cascade, variant 3 (Speculative Cascades, token-specific rules).

    A = {v : p(v) >= (1 - alpha) max p}: the draft may keep a token whose target probability is within a
    factor (1 - alpha) of the target's top probability (relative version of variant 2).
    pi(v) = q(v) 1[v in A] + p(v) sum_{v' not in A} q(v'); see the shared class docstring."""

    def accepted(self, q_rule: torch.Tensor, p_rule: torch.Tensor) -> torch.Tensor:
        return p_rule >= (1.0 - self.alpha) * p_rule.max(dim=-1, keepdim=True).values

    def _x_in_a(self, q_x, p_x, max_p):
        return p_x >= (1.0 - self.alpha) * max_p
