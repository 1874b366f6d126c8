"""The draft stage of a round, on the device: draft every cascading sequence's block (``Drafter.run``), then
find where each block ends (EOS, stop ids, a policy's ``stop_drafting``, stop strings), score the draft's
confidence (and the learned router's) and run each policy's trigger, with one host read of it all
(``Drafter.settle``).

A ``Drafter`` owns the draft runner and reads everything else through its arguments (the sequences and
their block lengths) and the round's ``RoundContext`` (vocabulary, end ids, detokenizer, router, counters,
the one host read point, the trace). The engine runs it between planning and the target pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from cascade.acceptance import group_by_policy, natural_logprob
from cascade.confidence import confidence_stats
from cascade.policies import BlockConfidence
from cascade.policies.state import has_fields, stack
from cascade.round import PolicyGroup, block_lengths, drafting_stops, run_triggers, segment_starts
from cascade.sampling import filter_logits, needs_filter, sample, top_lists, top_logprobs
from cascade.models.base import ModelRunner
from cascade.round_batch import Block, DraftedBlocks
from cascade.round_context import RoundContext
from cascade.scheduler import Sequence
from cascade.speculation import RoundClock


class Drafter:
    """Drafting, block ends, confidence and triggers over the draft runner (see the module docstring)."""

    def __init__(self, runner: ModelRunner, context: RoundContext) -> None:
        self.draft = runner
        self.context = context

    # ------------------------------------------------------------------ 1. draft
    def run(self, seqs: list[Sequence], ks: list[int], clock: RoundClock | None = None) -> Drafted:
        """Draft every sequence's block on the device: one ragged pass over the pending tokens, then one
        batched ``decode`` per further position, each fed the tokens the previous step sampled (device
        tensors: no host read between steps); where every step is a plain argmax, those decodes are one
        ``decode_loop`` call (one CUDA graph for the whole block). Sequence i drafts ``ks[i]`` tokens (its
        block length this round) here; where its block ends (an EOS, a policy's ``stop_drafting``, a stop
        string) is settled after it, with the trigger (``settle``), and positions past it are discarded."""
        t0 = time.perf_counter()
        ctx = self.context
        dev = self.draft.device
        rows = [s.row for s in seqs]
        pending = [s.tokens[s.draft_len:] for s in seqs]
        for s, span in zip(seqs, pending):
            s.count_positions(s.draft_len, len(span), draft=True)
            s.draft_len += len(span)
        logits = ctx.cut_vocab(self.draft.forward_span(rows, pending, num_logits=[1] * len(seqs)))  # [B, V]
        if clock is not None:
            clock.mark("draft_fed")  # the pending pass (a catch-up after rounds without drafting) is done
        step_members: list[list[int]] = []  # per step: the sequences drafted at it (indices into seqs)
        step_logits: list[torch.Tensor] = []  # per step: [A_j, V] filtered logits the tokens were drawn from
        step_tokens: list[torch.Tensor] = []  # per step: [A_j] int64 on the device
        active = list(range(len(seqs)))
        loop_steps = self.greedy_loop_steps(seqs, ks)  # > 0: steps 1 .. k - 1 run as one greedy loop below
        for j in range(1 if loop_steps else max(ks)):
            if j > 0:
                slot = {i: a for a, i in enumerate(active)}
                active = [i for i in active if ks[i] > j]
                if not active:
                    break
                pick = torch.tensor([slot[i] for i in active], dtype=torch.int64).to(dev, non_blocking=True)
                row_t = torch.tensor([rows[i] for i in active], dtype=torch.int64)
                logits = ctx.cut_vocab(self.draft.decode(row_t, step_tokens[-1].to(dev).index_select(0, pick)))
                for i in active:
                    seqs[i].draft_len += 1
            params = [seqs[i].params for i in active]
            filtered = filter_logits(logits, params, [seqs[i].num_emitted + j for i in active], ctx.eos_token_ids)
            step_tokens.append(sample(filtered, params, [seqs[i].rng for i in active]))
            step_logits.append(filtered)
            step_members.append(active)
        if loop_steps:  # every step a plain argmax: the rest of the block in one runner call (one graph)
            loop_logits, loop_tokens = self.draft.decode_loop(rows, step_tokens[0], loop_steps, ctx.vocab_size)
            for s in seqs:
                s.draft_len += loop_steps
            for j in range(loop_steps):
                step_logits.append(ctx.cut_vocab(loop_logits[j]).float())  # [B, V]
                step_tokens.append(loop_tokens[j])
                step_members.append(active)
        # the drafted positions, sequence-major: sequence i owns flat rows offsets[i] .. offsets[i] + ks[i]
        where = {(i, j): base + a for j, (base, members) in enumerate(zip(segment_starts([len(m) for m in step_members]), step_members))
                 for a, i in enumerate(members)}
        order = torch.tensor([where[(i, j)] for i in range(len(seqs)) for j in range(ks[i])], dtype=torch.int64)
        order = order.to(step_logits[0].device, non_blocking=True)
        drafted = Drafted(seqs=seqs, ks=ks, logits=torch.cat(step_logits).index_select(0, order),
                           tokens=torch.cat(step_tokens).to(step_logits[0].device).index_select(0, order))
        if clock is not None:
            clock.mark("draft_steps_done")
        ctx.stats.time_draft_s += time.perf_counter() - t0
        return drafted

    def greedy_loop_steps(self, seqs: list[Sequence], ks: list[int]) -> int:
        """The steps after the first that the draft can run as one greedy loop (``decode_loop``), or 0:
        only when every sequence drafts the same k >= 2 and every step is a plain argmax (greedy, no
        logit processing at any of the block's positions), so the loop's tokens are exactly what the
        step-by-step path would sample."""
        if not seqs or min(ks) != max(ks) or ks[0] < 2:
            return 0
        for s in seqs:
            if not s.params.greedy or needs_filter(s.params, s.num_emitted + 1, self.context.eos_token_ids):
                return 0
        return ks[0] - 1

    # ------------------------------------------------------------------ 2-3. block ends, confidence, trigger
    def settle(self, d: Drafted) -> DraftedBlocks:
        """Where each block ends, the draft's confidence and each policy's trigger, on the device, then one
        host read of it all (a second one only when a stop string, which needs the text, ends a block
        earlier than the device could see).

        A block ends at its first EOS (unless ``ignore_eos``) or its first position after which its policy
        ``stop_drafting`` (BiLD's fallback), else at its full length; nothing past the end is triggered on,
        scored or counted (the positions drafted past it cost a few draft steps, at most k - 1 per block
        end). Returns the settled blocks, flat: the drafted rows stay where ``run`` put them."""
        t0 = time.perf_counter()
        ctx = self.context
        seqs, ks = d.seqs, d.ks
        dev = d.logits.device
        B = len(seqs)
        temp_list = [s.params.temperature for s, k in zip(seqs, ks) for _ in range(k)]
        temps = torch.tensor(temp_list, dtype=torch.float32)
        conf = confidence_stats(d.logits, temps.to(dev, non_blocking=True), d.tokens)  # [N] each
        offsets = segment_starts(ks)  # sequence i owns flat rows offsets[i] .. offsets[i] + ks[i]
        index, valid_k = _padded_layout(ks)  # host: [B, K] flat row of each (sequence, position), [B, K] bool
        index_d, valid_kd = index.to(dev, non_blocking=True), valid_k.to(dev, non_blocking=True)

        # block ends the device can see: an EOS, a policy's stop_drafting
        eos_ok = torch.tensor([not s.params.ignore_eos for s, k in zip(seqs, ks) for _ in range(k)])
        ends_flat = torch.isin(d.tokens, ctx.eos_ids.to(dev)) & eos_ok.to(dev, non_blocking=True)  # [N]
        for i, s in enumerate(seqs):  # a request's own stop_token_ids end its block too
            if s.params.stop_token_ids and ks[i]:
                own = torch.tensor(s.params.stop_token_ids, dtype=torch.int64).to(dev, non_blocking=True)
                ends_flat[offsets[i]:offsets[i] + ks[i]] |= torch.isin(d.tokens[offsets[i]:offsets[i] + ks[i]], own)
        groups = policy_groups(seqs, dev)
        cut = _pad(ends_flat, index_d, valid_kd, False)  # [B, K]
        if any(g.policy.stops_drafting for g in groups):  # (most rounds: no policy of the batch stops early)
            cut = cut | (drafting_stops(_pad(conf.max_prob.float(), index_d, valid_kd, 0.0), groups) & valid_kd)
        ks_d = torch.tensor(ks, dtype=torch.int64).to(dev, non_blocking=True)
        lens = block_lengths(cut, ks_d)  # [B] block length after the device-seen ends
        ends_eos = _pad(ends_flat, index_d, valid_kd, False).gather(1, (lens - 1).view(B, 1)).squeeze(1)

        logprobs = conf.token_logprob.float()  # natural log q of each drafted token (stats at T = 1 for T in {0, 1})
        other_t = [r for r, t in enumerate(temp_list) if t not in (0.0, 1.0)]
        if other_t:
            rows_t = torch.tensor(other_t, dtype=torch.int64).to(dev)
            logprobs = logprobs.index_copy(0, rows_t, natural_logprob(d.logits.index_select(0, rows_t), d.tokens.index_select(0, rows_t)))
        router = (ctx.router.score(conf.max_prob, conf.margin, conf.entropy, conf.token_logprob)
                  if ctx.router is not None and any(s.policy.uses_router for s in seqs) else None)
        keep, escalate = self._trigger(seqs, conf, router, index_d, valid_kd, lens, groups)
        K = max(s.params.logprobs for s in seqs)  # top log-probs asked for: read with the rest
        traced = [i for i, s in enumerate(seqs) if ctx.trace is not None and ctx.trace.wants(s.request_id, "draft")]
        stats = [conf.max_prob, conf.margin, conf.entropy] if traced else []  # (cascade.trace: read with the rest)
        tokens_h, lens_h, ends_h, keep_h, esc_h, lp_h, *rest = ctx.fetch(
            d.tokens, lens, ends_eos, keep, escalate, logprobs, *stats, *(top_logprobs(d.logits, K) if K else []))
        stats_h, top_h = rest[:len(stats)], rest[len(stats):]
        top_rows = top_lists(*top_h, K) if K else []
        lens_l, ends_l = lens_h.tolist(), ends_h.tolist()

        # stop strings: the host's text decides; a block they cut is triggered again on its new length
        recut = False
        for i, s in enumerate(seqs):
            if not s.params.stop or ctx.detokenize is None:
                continue
            toks = tokens_h[offsets[i]:offsets[i] + lens_l[i]].tolist()
            for p in range(lens_l[i]):
                if ctx.completes_stop(s, toks[: p + 1]):
                    recut |= p + 1 < lens_l[i]
                    lens_l[i], ends_l[i] = p + 1, True
                    break
        if recut:
            lens = torch.tensor(lens_l, dtype=torch.int64).to(dev, non_blocking=True)
            keep_h, esc_h = ctx.fetch(*self._trigger(seqs, conf, router, index_d, valid_kd, lens, groups))
        for i in traced:  # the settled block, an ending EOS included: a draft-only request's answer
            start, stop = offsets[i], offsets[i] + lens_l[i]
            ctx.trace.add_draft(seqs[i].request_id, tokens_h[start:stop].tolist(),
                                 *(t[start:stop].tolist() for t in stats_h))
        blocks = []
        for i, s in enumerate(seqs):
            n, start = lens_l[i], offsets[i]
            s.stats.draft_tokens += n - 1  # the decode steps of the block (its first position was a pending pass)
            blocks.append(Block(
                tokens=tokens_h[start:start + n].tolist(), logprobs=lp_h[start:start + n].tolist(),
                keep=int(keep_h[i]), escalate=bool(esc_h[i]), final=bool(ends_l[i]) or n >= s.params.max_tokens - s.num_emitted,
                top=[t[:s.params.logprobs] for t in top_rows[start:start + n]] if s.params.logprobs else []))
        ctx.stats.time_kernels_s += time.perf_counter() - t0
        return DraftedBlocks(blocks=blocks, offsets=offsets, logits=d.logits)

    def _trigger(self, seqs: list[Sequence], conf, router: torch.Tensor | None, index: torch.Tensor,
                 valid_k: torch.Tensor, lens: torch.Tensor, groups: list[PolicyGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each policy's trigger over its sequences' blocks (confidence padded to [B, K], positions past each
        block's length ``lens`` [B] invalid; ``cascade.round.run_triggers``) -> (keep [B] int64, escalate [B]
        bool), on the device."""
        B, K = index.shape
        dev = index.device
        valid = valid_k & (torch.arange(K, device=dev).view(1, K) < lens.view(B, 1))

        def pad(x: torch.Tensor) -> torch.Tensor:
            return _pad(x.float(), index, valid, 0.0)

        block_conf = BlockConfidence(
            max_prob=pad(conf.max_prob), margin=pad(conf.margin), entropy=pad(conf.entropy),
            token_logprob=pad(conf.token_logprob), valid=valid, drafted=lens,
            catch_up=torch.tensor([len(s.tokens) - max(s.target_len, len(s.prompt_ids)) for s in seqs],
                                  dtype=torch.int64).to(dev, non_blocking=True),
            router=pad(router) if router is not None else None,
        )
        return run_triggers(block_conf, groups)


def policy_groups(seqs: list[Sequence], device: torch.device) -> list[PolicyGroup]:
    """The batch's sequences by policy, each group with its members' stacked state (``cascade.round``); one
    group of every row where the whole batch shares a policy."""
    by_policy = group_by_policy(range(len(seqs)), [s.policy for s in seqs])
    groups = []
    for policy, members in by_policy.items():
        index = None if len(by_policy) == 1 else torch.tensor(members, dtype=torch.int64).to(device, non_blocking=True)
        state = stack([seqs[i].policy_state for i in members], device) if has_fields(policy.State) else None
        groups.append(PolicyGroup(policy, index, state))
    return groups


@dataclass
class Drafted:
    """What ``Drafter.run`` drafted, before the block ends are settled: sequence i's ``ks[i]`` positions
    are flat rows ``sum(ks[:i]) ..`` of ``logits`` [N, V] (filtered, float32) and ``tokens`` [N] (device)."""

    seqs: list[Sequence]
    ks: list[int]
    logits: torch.Tensor
    tokens: torch.Tensor


def _padded_layout(lengths: Seq[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments of ``lengths`` laid out flat -> (index [B, K] int64: the flat row of (segment, position),
    0 where padding; valid [B, K] bool), K = max length. Host tensors."""
    B, K = len(lengths), max(lengths)
    index = torch.zeros(B, K, dtype=torch.int64)
    valid = torch.zeros(B, K, dtype=torch.bool)
    for b, (start, n) in enumerate(zip(segment_starts(lengths), lengths)):
        index[b, :n] = torch.arange(start, start + n)
        valid[b, :n] = True
    return index, valid


def _pad(flat: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, fill) -> torch.Tensor:
    """flat [N] -> [B, K] by ``index`` where ``valid``, ``fill`` elsewhere (same device, no host read)."""
    return torch.where(valid, flat[index], torch.full((), fill, dtype=flat.dtype, device=flat.device))
