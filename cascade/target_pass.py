"""Step 5 of a round: ONE ragged target pass over every escalated sequence (its catch-up, then its kept block:
logits at the block positions and the bonus position, none after a block that ends the request;
``cascade.round.target_layout``) and every sequence the target decodes alone (its pending tokens, one
position scored).

A ``TargetPass`` owns the target runner and reads the rest through its arguments and the round's
``RoundContext``; it counts each sequence's target positions (prefill apart) and escalations. What to do when
the target is unreachable (fail the round or finish on the draft) is the engine's decision: the pass only
reports it, by letting ``TargetUnavailable`` through.
"""

from __future__ import annotations

import time

import torch

from cascade.models.base import ModelRunner, TargetUnavailable
from cascade.round import segment_starts, target_layout
from cascade.round_batch import Block, TargetLogits
from cascade.round_context import RoundContext
from cascade.scheduler import Sequence


class TargetPass:
    """The round's target pass over the target runner (see the module docstring)."""

    def __init__(self, runner: ModelRunner, context: RoundContext) -> None:
        self.target = runner
        self.context = context

    def run(
        self, escalated: list[Sequence], blocks: list[Block], target_only: list[Sequence], *, exact: bool = False
    ) -> TargetLogits | None:
        """One ragged target pass over ``escalated`` (with their ``blocks``, aligned) then ``target_only``;
        returns its logits, flat (``TargetLogits``: per member the block positions + the bonus position for
        an escalated sequence, none after a kept block that ends the request; one position for a target-only
        sequence), or None when there is no member.

        ``exact``: the batch-invariant stepwise pass (``EngineConfig.exact_verify``, see ``stepwise``). A target
        that raises ``TargetUnavailable`` leaves every sequence as it was (its error counted in each member's
        stats) and the error propagates: the engine fails or degrades the round."""
        members = escalated + target_only
        if not members:
            return None
        t0 = time.perf_counter()
        blks: list[Block | None] = list(blocks) + [None] * len(target_only)
        # a block that ends the request is fed without its last token and has no bonus position (its catch-up
        # is never empty: the target lags by at least the previous round's last token); target-only: 0 and 1
        fed, num_logits = (t.tolist() for t in target_layout(
            torch.tensor([blk.keep if blk is not None else 0 for blk in blks]),
            torch.tensor([blk is not None and blk.ends_request for blk in blks])))
        spans = [s.tokens[s.target_len:] + (blk.tokens[:n] if blk is not None else []) for s, blk, n in zip(members, blks, fed)]
        try:
            if exact:
                logits = self.stepwise(members, spans, num_logits)
            else:
                logits = self.target.forward_span([s.row for s in members], spans, num_logits=num_logits)
            logits = self.context.cut_vocab(logits)
        except TargetUnavailable:
            self.context.stats.time_target_s += time.perf_counter() - t0
            for s in members:
                s.stats.target_errors += 1
            raise
        for s, blk, span, n, n_block in zip(members, blks, spans, num_logits, fed):
            catch_up = len(span) - n_block
            s.count_positions(s.target_len, catch_up, draft=False)
            s.stats.target_tokens += len(span) - catch_up
            s.stats.target_scored_tokens += n
            s.target_len += len(span)
            s.stats.target_stateless_tokens += s.target_len  # over a stock OpenAI route this pass recomputes all of it
            if blk is not None:
                s.stats.escalations += 1
            else:
                s.stats.target_only_steps += 1
        self.context.stats.time_target_s += time.perf_counter() - t0
        return TargetLogits(logits=logits, starts=segment_starts(num_logits), counts=num_logits,
                            positions=sum(len(span) for span in spans))

    def stepwise(self, members: list[Sequence], spans: list[list[int]], num_logits: list[int]) -> torch.Tensor:
        """``forward_span`` of the target pass, computed the way target-only decoding computes it at batch 1:
        a prompt in a call of its own (as a target-only request's first round), then one token of one
        sequence per call. A 1-row decode and a k-row verify reduce in different orders, and so do calls
        whose row count differs (GEMM blocking depends on it), so in bf16 they part at near-ties; this path
        makes every target position's arithmetic that of a batch-1 target-only decode, whatever else is in
        the batch (batch-invariant), hence ``speculative`` greedy == batch-1 ``target-only`` greedy token
        for token at any batch in any dtype (and so does ``target-only`` itself in this mode). The cost: a
        block is verified in as many sequential target calls as it has tokens, one sequence at a time.
        Returns logits [sum(num_logits), V] in ``forward_span``'s layout."""
        rows = [s.row for s in members]
        picked: list[list[torch.Tensor]] = [[] for _ in members]
        pos = [0] * len(members)
        for i, s in enumerate(members):
            if s.target_len == 0:  # the prompt, alone, as target-only's first round feeds it
                n = len(s.prompt_ids)
                logits = self.target.forward_span([rows[i]], [spans[i][:n]], num_logits=[1])
                if n > len(spans[i]) - num_logits[i]:
                    picked[i].append(logits[0])
                pos[i] = n
        while True:
            active = [i for i in range(len(members)) if pos[i] < len(spans[i])]
            if not active:
                break
            for i in active:  # one row per call: a row's result never depends on the others
                logits = self.target.forward_span([rows[i]], [[spans[i][pos[i]]]], num_logits=[1])
                pos[i] += 1
                if pos[i] > len(spans[i]) - num_logits[i]:
                    picked[i].append(logits[0])
        return torch.cat([torch.stack(p) for p in picked])
