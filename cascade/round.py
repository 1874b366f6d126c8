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
- ``accepted_counts``: per sequence, the accepted prefix of its block (the first rejection ends it).

Both callers count positions from these: the target processes catch-up + ``fed`` positions and scores
``num_logits`` of them; the draft processes its pending tokens and one decode step per further token.
"""

from __future__ import annotations

import torch


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
