"""Step 6 of a round (DESIGN.md, "One round"): what the target's logits decide about drafted blocks.

Owns the per-round ``Block`` (what a sequence drafted and what its trigger kept) and ``Verdict`` (what
verification decided), and ``decide_on_device``: one fused ``verify_stats`` call over every escalated position
of the batch, each policy's deferral rule and acceptance test on its own rows (or, for rules that need
them, the full distributions ``pi`` and ``q``), then per sequence the accepted prefix, the replacement
token (residual or target sample) at the first rejection or the bonus token after a fully accepted block
(none after a block that ends the request: its last token is an EOS, a stop string's end or the
max_tokens-th token, so a bonus would be dropped anyway and its position is not scored).

It reads sequences and their generators but changes no cache: the engine commits the verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable, Sequence as Seq

import torch

from cascade.metrics import EmittedToken, TokenSource
from cascade.policies import Policy, residual_distribution, speculative_acceptance, verify_distributions
from cascade.round import accepted_counts, rule_acceptance, segment_starts
from cascade.sampling import filter_logits, noise_seeds, sample, top_lists, top_logprobs, uniforms
from cascade.scheduler import Sequence
from cascade.verification import VerifyStats, verify_stats


@dataclass
class Block:
    """A sequence's drafted block within the current round."""

    tokens: list[int]  # drafted tokens d_1..d_k
    logits: torch.Tensor  # [k, V] float32, filtered draft logits the tokens were drawn from
    logprobs: list[float] = field(default_factory=list)  # natural log q(d_j)
    final: bool = False  # the last drafted token ends the request (EOS, stop string, max_tokens)
    keep: int = 0  # block length chosen by the trigger
    escalate: bool = False
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per drafted token when the request
    #   asks for top log-probs: the draft's most likely tokens (id, natural log-prob)

    def emitted(self, j: int) -> EmittedToken:
        """Drafted token j as emitted by the draft (not verified)."""
        return EmittedToken(self.tokens[j], TokenSource.DRAFT, self.logprobs[j], tuple(self.top[j]) if self.top else ())

    @property
    def ends_request(self) -> bool:
        """The kept block ends the request if all of it is accepted (no bonus token follows it)."""
        return self.final and self.keep == len(self.tokens)


@dataclass
class Verdict:
    """What verification decided for one escalated sequence."""

    kept: int  # draft tokens of this round's block that were accepted
    emitted: list[EmittedToken]  # the kept tokens, then the replacement or bonus token (none after a block that
    #   ends the request)


class PendingVerdicts:
    """Verification decided on the device, not yet read: ``tensors`` go through one host read (the engine's
    ``fetch``, with whatever else the round reads), then ``finish`` turns them into ``Verdict``s."""

    def __init__(self, seqs: list[Sequence], blocks: dict[str, Block], tensors: list[torch.Tensor],
                 offsets: dict[str, int]):
        self.seqs, self.blocks, self._tensors, self.offsets = seqs, blocks, tensors, offsets

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors

    def finish(self, host: Seq[torch.Tensor]) -> dict[str, Verdict]:
        """host: the ``tensors`` on the host -> {request_id: Verdict}; counts each sequence's stats."""
        if not self.seqs:
            return {}
        n_acc_t, extra_t, extra_lp_t, delta_t, logp_t = host[:5]
        n_acc_l, extra_l, extra_lp_l = n_acc_t.tolist(), extra_t.tolist(), extra_lp_t.tolist()
        delta_l, logp_l = delta_t.tolist(), logp_t.tolist()
        K = host[5].shape[1] if len(host) > 5 else 0  # top log-probs: [R, K] verified rows, [S, K] extra tokens
        top_rows = top_lists(host[5], host[6], K) if K else []
        top_extra = top_lists(host[7], host[8], K) if K else []
        result = {}
        for i, s in enumerate(self.seqs):
            block = self.blocks[s.request_id]
            n, n_acc = block.keep, int(n_acc_l[i])
            off = self.offsets.get(s.request_id, 0)
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
                result[s.request_id] = Verdict(kept=n_acc, emitted=emitted)
                continue
            else:
                source = TokenSource.BONUS
                s.stats.bonus_tokens += 1
            emitted.append(EmittedToken(int(extra_l[i]), source, float(extra_lp_l[i]),
                                        tuple(top_extra[i][:k]) if k else ()))
            result[s.request_id] = Verdict(kept=n_acc, emitted=emitted)
        return result


def decide_on_device(
    seqs: list[Sequence], blocks: dict[str, Block], target_logits: dict[str, torch.Tensor],
    eos_token_ids: Iterable[int] = (),
) -> PendingVerdicts:
    """Deferral + acceptance for every escalated sequence, computed on the target's device with no host read:
    one fused verify-stats call over all their block positions, each policy's rule on its rows (or, for
    rules that need them, the full distributions), one uniform per position from the request's generator,
    the accepted prefix of every block at once, and for every sequence both candidates for its last token
    (the replacement at its first rejection, the bonus after a fully accepted block) with their natural
    log-probs; which one applies is picked on the device too. Draws come from each request's generator in
    a fixed order per request (noise keys, uniforms, the residual draw, the bonus draw), so seeded output
    does not depend on the batch; a candidate that does not apply still consumes its draw."""
    if not seqs:
        return PendingVerdicts([], blocks, [], {})
    dev = next(iter(target_logits[s.request_id] for s in seqs)).device
    keeps = [blocks[s.request_id].keep for s in seqs]
    offsets, start = {}, 0
    for s, n in zip(seqs, keeps):
        offsets[s.request_id] = start
        start += n
    R = start
    verified = [s for s, n in zip(seqs, keeps) if n > 0]
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
        def rows(s: Sequence) -> torch.Tensor:
            b = blocks[s.request_id]
            return filter_logits(target_logits[s.request_id][: b.keep], [s.params] * b.keep,
                                 [s.num_emitted + j for j in range(b.keep)], eos_token_ids)

        p_logits = torch.cat([rows(s) for s in verified])  # [R, V]
        q_logits = torch.cat([blocks[s.request_id].logits[: blocks[s.request_id].keep] for s in verified]).to(dev)
        toks_h = torch.tensor([t for s in verified for t in blocks[s.request_id].tokens[: blocks[s.request_id].keep]], dtype=torch.int64)
        temps_h = torch.cat([torch.full((blocks[s.request_id].keep,), s.params.temperature) for s in verified])
        toks, temps = toks_h.to(dev, non_blocking=True), temps_h.to(dev, non_blocking=True)
        seeds = torch.cat([noise_seeds(blocks[s.request_id].keep, s.rng.on(dev)) for s in verified])
        stats = verify_stats(q_logits, p_logits, toks, temps, seeds)
        logp_x = stats.logp_token.float()  # natural log p(x) where T in {0, 1}
        other_t = [r for r, t in enumerate(temps_h.tolist()) if t not in (0.0, 1.0)]
        if other_t:
            idx = torch.tensor(other_t, dtype=torch.int64).to(dev)
            logp_x = logp_x.index_copy(0, idx, natural_logprob(p_logits.index_select(0, idx), toks.index_select(0, idx)))
        accept_all = torch.zeros(R, dtype=torch.float32, device=dev)
        dists: dict[Policy, tuple[list[Sequence], torch.Tensor, torch.Tensor, list[int]]] = {}
        for policy, members in group_by_policy(verified, [s.policy for s in verified]).items():
            rows_h = [i for s in members for i in range(offsets[s.request_id], offsets[s.request_id] + blocks[s.request_id].keep)]
            idx = torch.tensor(rows_h, dtype=torch.int64).to(dev, non_blocking=True)
            sub = _take(stats, idx)
            if policy.needs_distributions:
                d = verify_distributions(q_logits[idx], p_logits[idx], toks[idx], temps[idx])
                pi, delta = policy.target_distribution(d, sub)
                accept = speculative_acceptance(pi, d.q, d.tokens)
                dists[policy] = (members, pi, d.q, segment_starts([blocks[s.request_id].keep for s in members]))
            else:
                delta, accept = rule_acceptance(policy, sub)
            delta_all = delta_all.index_copy(0, idx, delta.float().to(dev))
            accept_all = accept_all.index_copy(0, idx, accept.float().to(dev))
        u = torch.cat([uniforms(blocks[s.request_id].keep, s.rng.on(dev)) for s in verified])
        n_acc = accepted_counts(accept_all, u, keeps_d, owner=owner.to(dev, non_blocking=True))  # [S]
        # the replacement at each block's first rejection (row clamped into the block; unused if none)
        offs_d = torch.tensor([offsets[s.request_id] for s in seqs], dtype=torch.int64).to(dev, non_blocking=True)
        row = (offs_d + torch.minimum(n_acc, (keeps_d - 1).clamp_min(0))).clamp_max(R - 1)
        from_target = torch.tensor([s.policy.replace_from_target for s in seqs]).to(dev, non_blocking=True)
        replacement = torch.where(from_target, stats.target_token[row], stats.residual_token[row])
        pos = {s.request_id: i for i, s in enumerate(seqs)}
        for members, pi, q, starts in dists.values():  # rules with their own pi: draw from norm(max(0, pi - q))
            m_idx = torch.tensor([pos[s.request_id] for s in members], dtype=torch.int64).to(dev, non_blocking=True)
            local = torch.tensor(starts, dtype=torch.int64).to(dev, non_blocking=True) + \
                torch.minimum(n_acc[m_idx], keeps_d[m_idx] - 1)
            res = residual_distribution(pi[local], q[local])  # [M, V]
            drawn = torch.stack([torch.multinomial(res[m], 1, generator=s.rng.on(dev))[0] for m, s in enumerate(members)])
            replacement = replacement.index_copy(0, m_idx, drawn)
        replacement_lp = natural_logprob(p_logits[row], replacement)
        if K:
            top_p = top_logprobs(p_logits, K)
            top_repl = [t[row] for t in top_p]
    # the bonus after a fully accepted block, where the block has a bonus position (not after one that ends the request)
    has_bonus = [not blocks[s.request_id].ends_request for s in seqs]
    bonus = torch.zeros(S, dtype=torch.int64, device=dev)
    bonus_lp = torch.zeros(S, dtype=torch.float32, device=dev)
    with_bonus = [i for i, h in enumerate(has_bonus) if h]
    if with_bonus:
        params = [seqs[i].params for i in with_bonus]
        b_logits = filter_logits(torch.cat([target_logits[seqs[i].request_id][keeps[i]:keeps[i] + 1] for i in with_bonus]), params,
                                 [seqs[i].num_emitted + keeps[i] for i in with_bonus], eos_token_ids)
        drawn = sample(b_logits, params, [seqs[i].rng for i in with_bonus])
        idx = torch.tensor(with_bonus, dtype=torch.int64).to(dev, non_blocking=True)
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
    return PendingVerdicts(seqs, blocks, tensors, offsets)


def sample_target_only(seqs: list[Sequence], target_logits: dict[str, torch.Tensor],
                   eos_token_ids: Iterable[int] = ()) -> list[torch.Tensor]:
    """The next token of every target-only sequence and its natural log-prob, on the device: [] or
    [tokens [T] int64, logprobs [T] float32]."""
    if not seqs:
        return []
    params = [s.params for s in seqs]
    filtered = filter_logits(torch.cat([target_logits[s.request_id][-1:] for s in seqs]), params,
                             [s.num_emitted for s in seqs], eos_token_ids)
    toks = sample(filtered, params, [s.rng for s in seqs])
    K = max(p.logprobs for p in params)
    return [toks, natural_logprob(filtered, toks)] + (top_logprobs(filtered, K) if K else [])


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
