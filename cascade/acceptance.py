"""Step 6 of a round (DESIGN.md, "One round"): what the target's logits decide about drafted blocks.

Owns the per-round ``Block`` (what a sequence drafted and what its trigger kept) and ``Verdict`` (what
verification decided), and ``verify_blocks``: one fused ``verify_stats`` call over every escalated position
of the batch, each policy's deferral rule and acceptance test on its own rows (or, for rules that need
them, the full distributions ``pi`` and ``q``), then per sequence the accepted prefix, the replacement
token (residual or target sample) at the first rejection or the bonus token after a fully accepted block
(none after a block that ends the request: its last token is an EOS, a stop string's end or the
max_tokens-th token, so a bonus would be dropped anyway and its position is not scored).

It reads sequences and their generators but changes no cache: the engine commits the verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence as Seq

import torch

from cascade.metrics import TokenSource
from cascade.policies import Policy, residual_distribution, speculative_acceptance, verify_distributions
from cascade.round import accepted_counts
from cascade.sampling import filter_logits, noise_seeds, sample, uniforms
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

    @property
    def ends_request(self) -> bool:
        """The kept block ends the request if all of it is accepted (no bonus token follows it)."""
        return self.final and self.keep == len(self.tokens)


@dataclass
class Verdict:
    """What verification decided for one escalated sequence."""

    kept: int  # draft tokens of this round's block that were accepted
    extra: list[int]  # the replacement or bonus token (one; none after a block that ends the request)
    sources: list[TokenSource]  # of the kept tokens + extra
    logprobs: list[float]  # of the kept tokens + extra


def verify_blocks(
    seqs: list[Sequence], blocks: dict[str, Block], target_logits: dict[str, torch.Tensor]
) -> dict[str, Verdict]:
    """Deferral + acceptance for every escalated sequence: one fused verify-stats call over all their
    block positions, each policy's rule on its rows, one uniform per position from the request's generator.
    -> {request_id: Verdict}."""
    verified = [s for s in seqs if blocks[s.request_id].keep > 0]
    stats: VerifyStats | None = None
    q_logits = p_logits = toks = temps = logp_x = None
    offsets, start = {}, 0
    for s in verified:
        offsets[s.request_id] = start
        start += blocks[s.request_id].keep
    if verified:
        def rows(s: Sequence) -> torch.Tensor:
            b = blocks[s.request_id]
            return filter_logits(target_logits[s.request_id][: b.keep], [s.params] * b.keep)

        p_logits = torch.cat([rows(s) for s in verified])  # [R, V]
        dev = p_logits.device
        q_logits = torch.cat([blocks[s.request_id].logits[: blocks[s.request_id].keep] for s in verified]).to(dev)
        toks = torch.tensor([t for s in verified for t in blocks[s.request_id].tokens[: blocks[s.request_id].keep]], dtype=torch.int64)
        temps = torch.cat([torch.full((blocks[s.request_id].keep,), s.params.temperature) for s in verified])
        seeds = torch.cat([noise_seeds(blocks[s.request_id].keep, s.rng.on(dev)) for s in verified])
        stats = verify_stats(q_logits, p_logits, toks.to(dev), temps.to(dev), seeds.to(dev))
        logp_x = stats.logp_token.float().cpu().clone()  # natural log p(x) where T in {0, 1}
        other_t = ~((temps == 0.0) | (temps == 1.0))
        if other_t.any():
            idx = other_t.nonzero().squeeze(1)
            logp_x[idx] = natural_logprob(p_logits[idx.to(dev)], toks[idx]).cpu()
    decisions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dists: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per request (pi, q) rows, distribution rules
    for policy, members in group_by_policy(verified, [s.policy for s in verified]).items():
        idx = torch.tensor([i for s in members for i in range(offsets[s.request_id], offsets[s.request_id] + blocks[s.request_id].keep)])
        idx_dev = idx.to(stats.q_token.device)
        sub = _take(stats, idx_dev)
        if policy.needs_distributions:
            d = verify_distributions(q_logits[idx_dev], p_logits[idx_dev], toks[idx], temps[idx])
            pi, delta = policy.target_distribution(d, sub)
            accept = speculative_acceptance(pi, d.q, d.tokens)
        else:
            pi = None
            delta = policy.deferral(sub).float()
            accept = policy.acceptance(sub, delta.to(sub.q_token.device))
        delta, accept = delta.float().cpu(), accept.float().cpu()
        pos = 0
        for s in members:
            n = blocks[s.request_id].keep
            decisions[s.request_id] = (delta[pos:pos + n], accept[pos:pos + n])
            if pi is not None:
                dists[s.request_id] = (pi[pos:pos + n], d.q[pos:pos + n])
            pos += n

    accepted: dict[str, int] = {}  # the accepted prefix of each verified block: one call over the flat rows
    if verified:
        keeps = torch.tensor([blocks[s.request_id].keep for s in verified])
        accept = torch.cat([decisions[s.request_id][1] for s in verified])
        u = torch.cat([uniforms(blocks[s.request_id].keep, s.rng.on(accept.device)) for s in verified])
        counts = accepted_counts(accept, u, keeps)
        accepted = {s.request_id: int(c) for s, c in zip(verified, counts.tolist())}
    result = {}
    for s in seqs:
        block = blocks[s.request_id]
        n = block.keep
        sources: list[TokenSource] = []
        logprobs: list[float] = []
        n_acc = accepted.get(s.request_id, 0)
        if n > 0:
            delta = decisions[s.request_id][0]
            off = offsets[s.request_id]
            for j, d_j in enumerate(delta[:n_acc].tolist()):
                sources.append(TokenSource.VERIFIED if d_j > 0 else TokenSource.DRAFT)
                logprobs.append(float(logp_x[off + j]) if d_j > 0 else block.logprobs[j])
        if n_acc < n:
            row = offsets[s.request_id] + n_acc
            if s.request_id in dists:
                pi, q = dists[s.request_id]
                res = residual_distribution(pi[n_acc:n_acc + 1], q[n_acc:n_acc + 1])[0]
                extra = int(torch.multinomial(res, 1, generator=s.rng.on(res.device))[0])
            else:
                replacement = stats.target_token if s.policy.replace_from_target else stats.residual_token
                extra = int(replacement[row])
            lp = natural_logprob(p_logits[row:row + 1], torch.tensor([extra]))
            sources.append(TokenSource.TARGET)
            s.stats.rejected_tokens += 1
            s.stats.replaced_tokens += 1
        elif block.ends_request:  # everything kept and the request ends with it: no bonus
            s.stats.accepted_tokens += n_acc
            result[s.request_id] = Verdict(kept=n_acc, extra=[], sources=sources, logprobs=logprobs)
            continue
        else:
            bonus_logits = filter_logits(target_logits[s.request_id][n:n + 1], [s.params])
            extra = int(sample(bonus_logits, [s.params], [s.rng])[0])
            lp = natural_logprob(bonus_logits, torch.tensor([extra]))
            sources.append(TokenSource.BONUS)
            s.stats.bonus_tokens += 1
        s.stats.accepted_tokens += n_acc
        result[s.request_id] = Verdict(kept=n_acc, extra=[extra], sources=sources, logprobs=logprobs + [float(lp[0])])
    return result

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
