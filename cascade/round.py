"""The bookkeeping of one round, defined once: pure functions over flat ragged tensors that the engine
(``cascade.engine``, ``cascade.acceptance``) and the benchmark's replay (``cascade.bench.replay``) both
call, so a budget calibrated by replay is the budget the engine spends.

Layout (as vLLM v1's rejection sampler lays out a batch): ``B`` sequences, each with a block of
``keep[b]`` verified positions; their per-position values are concatenated into flat ``[R]`` tensors,
``R = sum(keep)``, sequence ``b`` owning rows ``offsets[b] .. offsets[b] + keep[b]``.

- ``settle_trigger``: what a trigger's answer means (a kept block is clamped to what was drafted; an
  empty kept block must be escalated, the target decides its position);
- ``target_layout``: what one escalation feeds the target and scores (a block that ends the request is
  fed without its last token, and has no bonus position);
- ``accepted_counts``: per sequence, the accepted prefix of its block (the first rejection ends it);
- ``draft_cache_keeps``: what of a committed block the draft's cache keeps (it always lags the last emitted
  token, fed next round), so the draft's catch-up next round is the same number in both callers.

Both callers count positions from these: the target processes catch-up + ``fed`` positions and scores
``num_logits`` of them; the draft processes its pending tokens and one decode step per further token.

The policy-dependent steps, over a padded ``[B, K]`` batch split into ``PolicyGroup``s (a policy, its rows,
its members' stacked state), are defined here once too, and both the engine's stages and the replay call
them: ``drafting_stops`` + ``block_lengths`` (where a block ends), ``run_triggers`` (each policy's trigger,
settled), ``rule_acceptance`` (a deferral rule's acceptance probabilities) and ``next_states`` (each
policy's state after the round).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from cascade.policies import BlockConfidence, Policy
from cascade.policies.state import RoundOutcome

if TYPE_CHECKING:
    from cascade.verification import VerifyStats


def segment_starts(lengths) -> list[int]:
    """Where each of consecutive flat segments of these lengths starts (exclusive prefix sums, on the host)."""
    out, acc = [], 0
    for n in lengths:
        out.append(acc)
        acc += int(n)
    return out


def settle_trigger(keep: torch.Tensor, escalate: torch.Tensor, drafted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B], escalate [B] bool (a trigger's answer), drafted [B] -> (keep [B] in [0, drafted],
    escalate [B]): a sequence whose kept block is empty is escalated."""
    keep = torch.minimum(keep.clamp_min(0), drafted)
    return keep, escalate | (keep == 0)


def target_layout(keep: torch.Tensor, ends_request: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B], ends_request [B] bool (the kept block's last token ends the request) -> (fed [B]: block
    tokens fed to the target after the catch-up, num_logits [B]: target positions scored = logits at the
    position before the block and at each fed block token; the last one is the bonus position unless the
    block ends the request)."""
    fed = keep - ends_request.long()
    return fed, fed + 1


def accepted_counts(accept: torch.Tensor, uniforms: torch.Tensor, keep: torch.Tensor,
                    owner: torch.Tensor | None = None) -> torch.Tensor:
    """accept [R] acceptance probabilities, uniforms [R] (one draw per row), keep [B] rows per sequence ->
    [B] int64: accepted rows before each sequence's first rejection (row j is accepted iff u_j < accept_j;
    on greedy rows accept is 0 or 1, so any u in (0, 1) decides the same).

    No host read of device values: ``owner`` [R] (the sequence of each row) may be given, built on the host
    from host-known block lengths; otherwise it is computed from ``keep`` (which then must be on the host or
    costs a sync)."""
    keep = keep.long()
    B = keep.numel()
    if B == 0:
        return keep.clone()
    if owner is None:
        owner = torch.repeat_interleave(torch.arange(B, device=keep.device), keep.to(keep.device))
    owner = owner.to(accept.device)
    keep = keep.to(accept.device)
    rejected = uniforms.to(accept.device).float() >= accept.float()
    starts = torch.cumsum(keep, 0) - keep
    local = torch.arange(rejected.numel(), device=accept.device) - starts[owner]  # [R] row index within its block
    candidate = torch.where(rejected, local, keep[owner])  # a rejection's index, else the block's length
    return keep.scatter_reduce(0, owner, candidate, reduce="amin")


def draft_cache_keeps(fed, kept, emitted):
    """Block tokens the draft's cache keeps after a round's commit, per sequence (ints, or int64 tensors of
    one shape): of the ``fed`` block tokens it holds after drafting (its decode steps were fed the drafted
    tokens before the last), those that stand (``kept``: the accepted prefix of an escalated block, else the
    trigger's kept block), never the round's last emitted token (``emitted`` tokens this round: it is fed
    next round, to score the position after it). The draft is fed ``emitted - draft_cache_keeps(...)``
    tokens at the start of the next round."""
    if isinstance(fed, torch.Tensor):
        return torch.minimum(torch.minimum(fed, kept), emitted - 1)
    return min(fed, kept, emitted - 1)


# --- the policy-dependent steps of a round, over a padded [B, K] batch (the engine's drafting stage and the
# --- replay both call these, so a policy's trigger, its early stop and its state are applied one way) -------


@dataclass(frozen=True)
class PolicyGroup:
    """The rows of a round batch that one policy decides: ``index`` [M] int64 (on the batch's device; None:
    every row) and its members' stacked state (``cascade.policies.state``; None: the policy keeps none)."""

    policy: Policy
    index: torch.Tensor | None = None
    state: Any = None


def first_true(mask: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """mask [B, K] bool -> [B] int64: the first True column of each row, ``default`` [B] where none."""
    return torch.where(mask.any(dim=1), mask.int().argmax(dim=1), default)


def drafting_stops(max_prob: torch.Tensor, groups: Sequence[PolicyGroup]) -> torch.Tensor:
    """max_prob [B, K] of the drafted tokens -> stop [B, K] bool: where each policy with ``stops_drafting``
    stops drafting right after that position (BiLD's fallback); False for the others."""
    stop = torch.zeros(max_prob.shape, dtype=torch.bool, device=max_prob.device)
    for g in groups:
        if not g.policy.stops_drafting:
            continue
        rows = max_prob if g.index is None else max_prob.index_select(0, g.index)
        said = g.policy.stop_drafting(rows.reshape(-1))
        if said is None:
            continue
        said = said.to(stop.device).view(rows.shape)
        stop = said if g.index is None else stop.index_copy(0, g.index, said)
    return stop


def block_lengths(cut: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
    """cut [B, K] bool (the block ends after this position: an EOS, a stop id, a policy's stop), drafted [B]
    -> [B] int64 block lengths: up to and including the first cut, at most what was drafted."""
    return torch.minimum(drafted, first_true(cut, drafted) + 1)


def run_triggers(conf: BlockConfidence, groups: Sequence[PolicyGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each policy's trigger over its rows of the padded batch confidence ``conf`` (with its members'
    state as ``conf.state``), settled (``settle_trigger``) -> (keep [B] int64, escalate [B] bool)."""
    B, dev = conf.drafted.shape[0], conf.drafted.device
    keep = torch.zeros(B, dtype=torch.int64, device=dev)
    escalate = torch.zeros(B, dtype=torch.bool, device=dev)
    for g in groups:
        if g.index is None:
            sub = dataclasses.replace(conf, state=g.state)
        else:
            sub = BlockConfidence(**{f.name: getattr(conf, f.name)[g.index] for f in dataclasses.fields(BlockConfidence)
                                     if isinstance(getattr(conf, f.name), torch.Tensor)}, state=g.state)
        kp, esc = settle_trigger(*g.policy.trigger(sub), sub.drafted)
        if g.index is None:
            keep, escalate = kp.to(dev, torch.int64), esc.to(dev, torch.bool)
        else:
            keep = keep.index_copy(0, g.index, kp.to(dev, torch.int64))
            escalate = escalate.index_copy(0, g.index, esc.to(dev, torch.bool))
    return keep, escalate


def rule_acceptance(policy: Policy, v: VerifyStats) -> tuple[torch.Tensor, torch.Tensor]:
    """A deferral-rule policy on verified rows' fused statistics ``v`` -> (delta [R] float32, accept [R]:
    the acceptance probability ``min(1, pi(x) / q(x))`` with ``pi = (1 - delta) q + delta p``)."""
    delta = policy.deferral(v).float()
    return delta, policy.acceptance(v, delta.to(v.q_token.device)).float()


def next_states(groups: Sequence[PolicyGroup], outcome: RoundOutcome) -> list[Any]:
    """Each stateful group's states after a round (``Policy.after_round``): ``outcome`` over the whole batch
    (host tensors) -> per group its members' next stacked state (None where the group keeps none)."""
    out = []
    for g in groups:
        if g.state is None:
            out.append(None)
            continue
        out.append(g.policy.after_round(g.state, outcome if g.index is None else outcome.take(g.index.cpu())))
    return out
