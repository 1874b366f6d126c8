"""Step 6 of a round (DESIGN.md, "One round"): what the target's logits decide about drafted blocks.

Owns ``Verdict`` (what verification decided for a block) and ``decide_on_device``: one fused ``verify_stats``
call over every escalated position of the batch, its rows gathered from the round's flat draft and target
logits by index (``cascade.round_batch``), each policy's deferral rule and acceptance test on its own rows (or, for rules that need
them, the full distributions ``pi`` and ``q``), then per sequence the accepted prefix, the replacement
token (residual or target sample) at the first rejection or the bonus token after a fully accepted block
(none after a block that ends the request: its last token is an EOS, a stop string's end or the
max_tokens-th token, so a bonus would be dropped anyway and its position is not scored).

It reads sequences and their generators but changes no cache: the engine commits the verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Sequence as Seq

import torch

from cascade.metrics import EmittedToken, TokenSource
from cascade.policies import Policy, residual_distribution, speculative_acceptance, verify_distributions
from cascade.round import accepted_counts, rule_acceptance, segment_starts
from cascade.round_batch import Block, DraftedBlocks, TargetLogits
from cascade.sampling import filter_logits, noise_seeds, sample, top_lists, top_logprobs, uniforms
from cascade.scheduler import Sequence
from cascade.verification import VerifyStats, verify_stats


@dataclass
class Verdict:
    """What verification decided for one escalated sequence."""

    kept: int  # draft tokens of this round's block that were accepted
    emitted: list[EmittedToken]  # the kept tokens, then the replacement or bonus token (none after a block that
    #   ends the request)


class PendingVerdicts:
    """Verification decided on the device, not yet read: ``tensors`` go through one host read (the engine's
    ``fetch``, with whatever else the round reads), then ``finish`` turns them into ``Verdict``s.
    ``ids``: the key of each escalated sequence's verdict (its index in the round's cascading sequences);
    ``offsets``: its first verified row."""

    def __init__(self, seqs: list[Sequence], blocks: list[Block], ids: list[int], tensors: list[torch.Tensor],
                 offsets: list[int]):
        self.seqs, self.blocks, self.ids, self._tensors, self.offsets = seqs, blocks, ids, tensors, offsets

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors

    def finish(self, host: Seq[torch.Tensor]) -> dict[int, Verdict]:
        """host: the ``tensors`` on the host -> {id: Verdict}; counts each sequence's stats."""
        if not self.seqs:
            return {}
        n_acc_t, extra_t, extra_lp_t, delta_t, logp_t = host[:5]
        n_acc_l, extra_l, extra_lp_l = n_acc_t.tolist(), extra_t.tolist(), extra_lp_t.tolist()
        delta_l, logp_l = delta_t.tolist(), logp_t.tolist()
        K = host[5].shape[1] if len(host) > 5 else 0  # top log-probs: [R, K] verified rows, [S, K] extra tokens
        top_rows = top_lists(host[5], host[6], K) if K else []
        top_extra = top_lists(host[7], host[8], K) if K else []
        result = {}
        for i, (s, block, key) in enumerate(zip(self.seqs, self.blocks, self.ids)):
            n, n_acc = block.keep, int(n_acc_l[i])
            off = self.offsets[i]
            k = s.params.logprobs
            emitted = []
            for j in range(n_acc):
                if delta_l[off + j] > 0:  # deferred to the target: its log-prob and alternatives
                    emitted.append(EmittedToken(block.tokens[j], TokenSource.VERIFIED, float(logp_l[off + j]),
                                                tuple(top_rows[off + j][:k]) if k else ()))
                else:
                    emitted.append(block.emitted(j))
            s.stats.verified_draft_tokens += n
            s.stats.accepted_tokens += n_acc
            if n_acc < n:
                source = TokenSource.TARGET
                s.stats.rejected_tokens += 1
                s.stats.replaced_tokens += 1
            elif block.ends_request:  # everything kept and the request ends with it: no bonus
                result[key] = Verdict(kept=n_acc, emitted=emitted)
                continue
            else:
                source = TokenSource.BONUS
                s.stats.bonus_tokens += 1
            emitted.append(EmittedToken(int(extra_l[i]), source, float(extra_lp_l[i]),
                                        tuple(top_extra[i][:k]) if k else ()))
            result[key] = Verdict(kept=n_acc, emitted=emitted)
        return result


def decide_on_device(
    cascading: list[Sequence], drafted: DraftedBlocks, escalated: list[int], target: TargetLogits,
    eos_token_ids: Iterable[int] = (),
) -> PendingVerdicts:
    """Deferral + acceptance for every escalated sequence (``escalated``: indices into ``cascading``, in the
    order of the target pass's first members), computed on the target's device with no host read: the
    verified rows gathered by index from the flat draft logits (``drafted``) and target logits (``target``),
    one fused verify-stats call over all of them, each policy's rule on its rows (or, for rules that need
    them, the full distributions), one uniform per position from the request's generator, the accepted
    prefix of every block at once, and for every sequence both candidates for its last token (the
    replacement at its first rejection, the bonus after a fully accepted block) with their natural
    log-probs; which one applies is picked on the device too. Draws come from each request's generator in
    a fixed order per request (noise keys, uniforms, the residual draw, the bonus draw), so seeded output
    does not depend on the batch; a candidate that does not apply still consumes its draw."""
    seqs = [cascading[i] for i in escalated]
    blocks = [drafted.blocks[i] for i in escalated]
    keeps = [b.keep for b in blocks]
    offsets = segment_starts(keeps)  # sequence m owns verified rows offsets[m] .. offsets[m] + keeps[m]
    if not seqs:
        return PendingVerdicts([], [], [], [], [])
    dev = target.logits.device
    R = sum(keeps)
    verified = [m for m, n in enumerate(keeps) if n > 0]
    S = len(seqs)
    owner = torch.repeat_interleave(torch.arange(S), torch.tensor(keeps, dtype=torch.int64))  # host [R]
    keeps_d = torch.tensor(keeps, dtype=torch.int64).to(dev, non_blocking=True)
    delta_all = torch.zeros(R, dtype=torch.float32, device=dev)
    logp_x = torch.zeros(R, dtype=torch.float32, device=dev)
    n_acc = torch.zeros(S, dtype=torch.int64, device=dev)
    replacement = torch.zeros(S, dtype=torch.int64, device=dev)
    replacement_lp = torch.zeros(S, dtype=torch.float32, device=dev)
    K = max(s.params.logprobs for s in seqs)  # top log-probs asked for (0: none)
    top_p = [torch.zeros(R, K, dtype=torch.float32, device=dev), torch.zeros(R, K, dtype=torch.int64, device=dev)]
    top_repl = [torch.zeros(S, K, dtype=torch.float32, device=dev), torch.zeros(S, K, dtype=torch.int64, device=dev)]
    top_bonus = [torch.zeros_like(t) for t in top_repl]
    if verified:
        # the verified rows, sequence-major: where each lives in the flat target and draft logits
        target_rows = [r for m in verified for r in target.block_rows(m, keeps[m])]
        draft_rows = drafted.draft_rows([escalated[m] for m in verified])
        row_params = [seqs[m].params for m in verified for _ in range(keeps[m])]
        row_positions = [seqs[m].num_emitted + j for m in verified for j in range(keeps[m])]
        p_logits = filter_logits(target.logits.index_select(0, _index(target_rows, dev)), row_params, row_positions,
                                 eos_token_ids)  # [R, V]
        q_logits = drafted.logits.index_select(0, _index(draft_rows, drafted.logits.device)).to(dev)  # [R, V]
        toks_h = torch.tensor([t for m in verified for t in blocks[m].tokens[: keeps[m]]], dtype=torch.int64)
        temps_h = torch.tensor([p.temperature for p in row_params], dtype=torch.float32)
        toks, temps = toks_h.to(dev, non_blocking=True), temps_h.to(dev, non_blocking=True)
        seeds = torch.cat([noise_seeds(keeps[m], seqs[m].rng.on(dev)) for m in verified])
        stats = verify_stats(q_logits, p_logits, toks, temps, seeds)
        logp_x = stats.logp_token.float()  # natural log p(x) where T in {0, 1}
        other_t = [r for r, t in enumerate(temps_h.tolist()) if t not in (0.0, 1.0)]
        if other_t:
            idx = torch.tensor(other_t, dtype=torch.int64).to(dev)
            logp_x = logp_x.index_copy(0, idx, natural_logprob(p_logits.index_select(0, idx), toks.index_select(0, idx)))
        accept_all = torch.zeros(R, dtype=torch.float32, device=dev)
        dists: dict[Policy, tuple[list[int], torch.Tensor, torch.Tensor, list[int]]] = {}
        for policy, members in group_by_policy(verified, [seqs[m].policy for m in verified]).items():
            rows_h = [r for m in members for r in range(offsets[m], offsets[m] + keeps[m])]
            idx = _index(rows_h, dev)
            sub = _take(stats, idx)
            if policy.needs_distributions:
                d = verify_distributions(q_logits[idx], p_logits[idx], toks[idx], temps[idx])
                pi, delta = policy.target_distribution(d, sub)
                accept = speculative_acceptance(pi, d.q, d.tokens)
                dists[policy] = (members, pi, d.q, segment_starts([keeps[m] for m in members]))
            else:
                delta, accept = rule_acceptance(policy, sub)
            delta_all = delta_all.index_copy(0, idx, delta.float().to(dev))
            accept_all = accept_all.index_copy(0, idx, accept.float().to(dev))
        u = torch.cat([uniforms(keeps[m], seqs[m].rng.on(dev)) for m in verified])
        n_acc = accepted_counts(accept_all, u, keeps_d, owner=owner.to(dev, non_blocking=True))  # [S]
        # the replacement at each block's first rejection (row clamped into the block; unused if none)
        offs_d = torch.tensor(offsets, dtype=torch.int64).to(dev, non_blocking=True)
        row = (offs_d + torch.minimum(n_acc, (keeps_d - 1).clamp_min(0))).clamp_max(R - 1)
        from_target = torch.tensor([s.policy.replace_from_target for s in seqs]).to(dev, non_blocking=True)
        replacement = torch.where(from_target, stats.target_token[row], stats.residual_token[row])
        for members, pi, q, starts in dists.values():  # rules with their own pi: draw from norm(max(0, pi - q))
            m_idx = _index(members, dev)
            local = torch.tensor(starts, dtype=torch.int64).to(dev, non_blocking=True) + \
                torch.minimum(n_acc[m_idx], keeps_d[m_idx] - 1)
            res = residual_distribution(pi[local], q[local])  # [M, V]
            drawn = torch.stack([torch.multinomial(res[a], 1, generator=seqs[m].rng.on(dev))[0]
                                 for a, m in enumerate(members)])
            replacement = replacement.index_copy(0, m_idx, drawn)
        replacement_lp = natural_logprob(p_logits[row], replacement)
        if K:
            top_p = top_logprobs(p_logits, K)
            top_repl = [t[row] for t in top_p]
    # the bonus after a fully accepted block, where the block has a bonus position (not after one that ends the request)
    with_bonus = [m for m, b in enumerate(blocks) if not b.ends_request]
    bonus = torch.zeros(S, dtype=torch.int64, device=dev)
    bonus_lp = torch.zeros(S, dtype=torch.float32, device=dev)
    if with_bonus:
        params = [seqs[m].params for m in with_bonus]
        bonus_rows = [target.last_row(m) for m in with_bonus]  # the position after each kept block
        b_logits = filter_logits(target.logits.index_select(0, _index(bonus_rows, dev)), params,
                                 [seqs[m].num_emitted + keeps[m] for m in with_bonus], eos_token_ids)
        drawn = sample(b_logits, params, [seqs[m].rng for m in with_bonus])
        idx = _index(with_bonus, dev)
        bonus = bonus.index_copy(0, idx, drawn)
        bonus_lp = bonus_lp.index_copy(0, idx, natural_logprob(b_logits, drawn))
        if K:
            top_bonus = [t.index_copy(0, idx, b) for t, b in zip(top_bonus, top_logprobs(b_logits, K))]
    rejected = n_acc < keeps_d
    extra = torch.where(rejected, replacement, bonus)
    extra_lp = torch.where(rejected, replacement_lp, bonus_lp)
    tensors = [n_acc, extra, extra_lp, delta_all, logp_x]
    if K:  # the top log-probs of every verified position and of each extra token, in the same read
        tensors += top_p + [torch.where(rejected.view(S, 1), r, b) for r, b in zip(top_repl, top_bonus)]
    return PendingVerdicts(seqs, blocks, list(escalated), tensors, offsets)


def sample_target_only(seqs: list[Sequence], target: TargetLogits, first: int,
                       eos_token_ids: Iterable[int] = ()) -> list[torch.Tensor]:
    """The next token of every target-only sequence (members ``first ..`` of the target pass, one scored row
    each) and its natural log-prob, on the device: [] or [tokens [T] int64, logprobs [T] float32]."""
    if not seqs:
        return []
    params = [s.params for s in seqs]
    rows = [target.last_row(first + m) for m in range(len(seqs))]
    filtered = filter_logits(target.logits.index_select(0, _index(rows, target.logits.device)), params,
                             [s.num_emitted for s in seqs], eos_token_ids)
    toks = sample(filtered, params, [s.rng for s in seqs])
    K = max(p.logprobs for p in params)
    return [toks, natural_logprob(filtered, toks)] + (top_logprobs(filtered, K) if K else [])


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Host row indices -> an int64 index tensor on ``device`` (copied without a sync)."""
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def natural_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Natural (T = 1) log-softmax of logits [N, V] at tokens [N] -> [N] float32."""
    tokens = tokens.to(logits.device).view(-1, 1)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tokens).squeeze(1)


def group_by_policy(items, policies: Seq[Policy]) -> dict[Policy, list]:
    groups: dict[Policy, list] = {}
    for item, policy in zip(items, policies):
        groups.setdefault(policy, []).append(item)
    return groups


def _take(v: VerifyStats, idx: torch.Tensor) -> VerifyStats:
    return type(v)(**{f.name: getattr(v, f.name)[idx] for f in fields(v)})
