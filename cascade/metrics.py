"""Cascade statistics: per-request counters, engine-wide totals, and where each emitted token came from.

Counting rules (DESIGN.md, "Cost accounting"):
- ``draft_tokens``: positions the draft decoded in blocks (discarded ones included).
- ``target_tokens``: generated-region positions a target pass processed: catch-up + block (the bonus
  token's logits come from the block's last position; a block that ends the request is fed without its
  last token), or one position per target-only step. Target passes = ``escalations + target_only_steps``. Prompt positions are counted apart, in
  ``*_prefill_tokens``, so that ``target_token_fraction`` measures escalation, not prompt length.
- ``target_token_fraction`` = target_tokens / emitted tokens.
- ``target_scored_tokens``: the target positions whose logits decided something: the block positions +
  the bonus position per escalation (none after a block that ends the request), one per target-only
  step. The rest of ``target_tokens`` is catch-up: draft tokens emitted without the target, which it must
  still read into its KV cache before it can verify the next block. Catch-up costs FLOPs (so it is in
  ``target_tokens`` and ``relative_cost``) but on a GPU it runs as a parallel prefill and adds little
  latency; ``target_scored_fraction`` is the share of tokens the target was actually consulted on.
- Request-level routing (``quantile``): a discarded draft answer's work stays counted in ``draft_tokens``
  / ``draft_prefill_tokens`` and the target's answer adds its own; ``emitted_tokens`` counts the final
  answer only, so ``relative_cost`` is honest about paying for both.
- ``relative_cost`` = FLOPs of both models / FLOPs the target alone would spend on the same prompt and
  output, with FLOPs = 2 * params * positions (prompt positions included on both sides).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


class TokenSource(enum.IntEnum):
    """Who decided an emitted token."""

    DRAFT = 0  # draft token emitted without target verification (block not escalated, or delta = 0)
    VERIFIED = 1  # draft token checked by a target pass and accepted (delta > 0 / deferred, or BiLD-checked)
    TARGET = 2  # sampled from the target: the replacement at a rejection, or a target-only step
    BONUS = 3  # sampled from the target after a fully accepted block

    @property
    def target_decided(self) -> bool:
        return self in (TokenSource.VERIFIED, TokenSource.TARGET, TokenSource.BONUS)


@dataclass(frozen=True)
class EmittedToken:
    """One emitted token, the one record every consumer reads (engine -> library, server, metrics): a new
    per-token field is a field here, set where the round decides it (``cascade.acceptance`` for target-decided
    tokens, ``cascade.commit`` for the draft's and the target-only ones) and read where it is shown."""

    id: int
    source: TokenSource  # who decided it
    logprob: float  # natural (T = 1) log-prob under the model that decided it (see ``cascade.engine``)
    top: tuple[tuple[int, float], ...] = ()  # when the request asks for top log-probs: that model's most likely
    #   tokens, (id, natural log-prob), best first


def top_logprob_lists(tokens: "list[EmittedToken]") -> list[list[tuple[int, float]]]:
    """Per token its top alternatives as lists, where the request asked for them; [] where it did not."""
    return [list(t.top) for t in tokens] if any(t.top for t in tokens) else []


@dataclass
class RequestStats:
    """Counters for one request."""

    prompt_tokens: int = 0
    emitted_tokens: int = 0  # tokens returned to the caller
    draft_tokens: int = 0
    draft_prefill_tokens: int = 0
    target_tokens: int = 0
    target_scored_tokens: int = 0  # target positions that scored a token (see the module docstring)
    target_prefill_tokens: int = 0
    target_stateless_tokens: int = 0  # sum over target passes of the sequence length at the pass's end (prompt
    #   included): the positions a target without prefix reuse computes (a stock OpenAI route recomputes the
    #   whole sequence on every pass); the bench's ``stock_remote_fraction`` axis
    escalations: int = 0  # target passes that verified a block of this request
    verified_draft_tokens: int = 0  # draft tokens the target scored to accept or reject them
    accepted_tokens: int = 0  # draft tokens accepted by verification
    rejected_tokens: int = 0  # first rejected draft token per escalation (the rest of the block is dropped)
    bonus_tokens: int = 0
    replaced_tokens: int = 0  # tokens sampled from the residual / target at a rejection
    target_only_steps: int = 0
    routed_to_target: int = 0  # request-level policies: 1 if the draft's answer was discarded for the target's
    target_errors: int = 0  # target passes that failed (TargetUnavailable) and fell back to the draft's tokens
    wall_time_s: float = 0.0

    @property
    def target_token_fraction(self) -> float:
        return self.target_tokens / self.emitted_tokens if self.emitted_tokens else 0.0

    @property
    def target_scored_fraction(self) -> float:
        return self.target_scored_tokens / self.emitted_tokens if self.emitted_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per escalation (accepted drafts + the replacement or bonus token)."""
        if not self.escalations:
            return 0.0
        return (self.accepted_tokens + self.bonus_tokens + self.replaced_tokens) / self.escalations

    def relative_cost(self, draft_params: int, target_params: int) -> float:
        draft = 2 * draft_params * (self.draft_tokens + self.draft_prefill_tokens)
        target = 2 * target_params * (self.target_tokens + self.target_prefill_tokens)
        baseline = 2 * target_params * (self.prompt_tokens + self.emitted_tokens)
        return (draft + target) / baseline if baseline else 0.0

    def add(self, other: "RequestStats") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["target_token_fraction"] = self.target_token_fraction
        d["mean_acceptance_length"] = self.mean_acceptance_length
        return d


@dataclass
class EngineStats:
    """Engine-wide totals across all requests and rounds, plus where the time went."""

    totals: RequestStats = field(default_factory=RequestStats)
    rounds: int = 0
    time_draft_s: float = 0.0
    time_target_s: float = 0.0
    time_kernels_s: float = 0.0  # confidence + verify
    time_total_s: float = 0.0
    host_syncs: int = 0  # device -> host reads of the rounds (``cascade.host.fetch`` calls)
    # dynamic speculation (``cascade.speculation``): block length chosen -> rounds that ran it
    block_length_rounds: dict[int, int] = field(default_factory=dict)
