"""Replay: sweep a policy's thresholds from statistics recorded once, by teacher forcing, instead of
generating again for every threshold.

Recording (``cascade.bench.paths.record_path``): for one problem and one answer the pair really produced (the
draft-only or the target-only answer), both models read prompt + answer in one forward pass each; at every answer
position ``PathStats`` keeps what the policies read in a greedy round.

Simulation (``simulate_paths``, all answers in one batch) walks the recorded answer in the engine's rounds, calling the policy's own
``trigger`` / ``deferral`` / ``acceptance`` on those statistics, and counts draft and target positions the
way the engine does (catch-up + block per escalation, prompt prefill apart). A greedy round's output is
decided by these statistics alone, so the walk is the real run for as long as every token it emits is the
recorded answer's token. When it would emit a different token the real run leaves the recorded answer
(it *diverges*); from there the walk is only an estimate.

How a replayed figure is labelled (``RunRecord.mode``):

- ``replay-exact``: no divergence on the draft-only answer: the real run's output is the draft-only
  answer, so quality is the draft's, exactly; costs are the walk's, exactly (the engine's block ends at a
  drafted EOS or stop string, as the walk's does at the end of the path).
- ``replay-target-path``: diverges from the draft's answer but never from the target-only answer: the
  output is the target's, quality exact; costs come from the walk on the target's answer, whose trigger
  read the draft's confidence on the target's prefix (an approximation after a draft/target mismatch).
- ``replay-estimate``: diverges from both. Quality is interpolated: draft quality + (target - draft) x
  the share of draft/target disagreements on the draft's answer that the policy resolved to the target.
  Costs come from the walk on the draft's answer.

``check_replay`` compares replayed records with real runs of the same policy (the harness runs one per
policy at its calibrated parameter) and reports the agreement.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from cascade.bench.paths import PathStats
from cascade.policies import BlockConfidence, Policy
from cascade.policies.state import RoundOutcome, has_fields, initial_batch, put, take, unstack
from cascade.round import (
    PolicyGroup,
    accepted_counts,
    block_lengths,
    draft_cache_keeps,
    drafting_stops,
    first_true,
    next_states,
    rule_acceptance,
    run_triggers,
    target_layout,
)

if TYPE_CHECKING:
    from cascade.bench.runs import RunRecord


@dataclass
class WalkResult:
    """What a policy's greedy rounds cost along a recorded answer, and where they left it."""

    draft_tokens: int
    target_tokens: int
    target_scored_tokens: int
    escalations: int
    diverged_at: int | None  # first position whose emitted token differs from the recorded one
    disagreements: int  # positions where argmax q != argmax p
    resolved_to_target: int  # of those, positions where the walk emitted the target's token
    first_draft_tokens: int = 0  # the counters at the end of the first round that emitted a token
    first_target_tokens: int = 0  #   (the modelled time to first token prices them)
    first_escalations: int = 0  # (target passes: escalations, plus target-alone steps)
    target_alone_steps: int = 0  # rounds in which the target decoded one token alone (the policy's plan said so)
    stateless_answer_tokens: int = 0  # sum over target passes of the answer positions the row held after the
    #   pass (RequestStats.target_stateless_tokens less the prompt per pass)


_FIELDS = ("tokens", "q_argmax", "p_argmax", "q_max", "q_margin", "q_entropy", "p_max", "tv", "logp_x")
_INT_FIELDS = ("tokens", "q_argmax", "p_argmax")
MAX_BLOCK = 64  # the largest ``Policy.k``: a block read from any position stays inside a stacked row


class PathBatch:
    """Recorded answers stacked once for batched walks: each field of ``PathStats`` as a flat
    ``[N * width]`` tensor (row i holds path i, zeros past its end; ``width`` = longest path + room for
    one more block), plus the walk's derived masks. A sweep builds it once and walks it per configuration."""

    def __init__(self, paths: Sequence[PathStats]) -> None:
        N = len(paths)
        self.width = max((len(p) for p in paths), default=0) + MAX_BLOCK + 1
        self.length = torch.tensor([len(p) for p in paths], dtype=torch.int64)  # [N]
        scored = [p.router_score is not None for p in paths]
        if any(scored) and not all(scored):
            raise ValueError("paths: router scores on some paths only (score_paths scores them all)")
        names = _FIELDS + (("router_score",) if paths and all(scored) else ())
        self.flat: dict[str, torch.Tensor] = {}
        for name in names:
            t = torch.zeros(N, self.width, dtype=torch.int64 if name in _INT_FIELDS else torch.float32)
            for i, p in enumerate(paths):
                t[i, :len(p)] = torch.tensor(getattr(p, name), dtype=t.dtype)
            self.flat[name] = t.reshape(-1)
        x, pa, tokens = self.flat["q_argmax"], self.flat["p_argmax"], self.flat["tokens"]
        self.flat.update(mis_x=x != tokens, mis_pa=pa != tokens, disagree=x != pa)

    def __len__(self) -> int:
        return self.length.numel()

    @property
    def has_router(self) -> bool:
        return "router_score" in self.flat

    def rows(self, idx: Sequence[int]) -> "PathBatch":
        """The batch of paths ``idx`` (same width)."""
        out = PathBatch.__new__(PathBatch)
        index = torch.tensor(list(idx), dtype=torch.int64)
        out.width, out.length = self.width, self.length[index]
        out.flat = {k: v.view(-1, self.width)[index].reshape(-1) for k, v in self.flat.items()}
        return out


def simulate_paths(policy: Policy, paths: Sequence[PathStats] | PathBatch) -> list[WalkResult]:
    """Walk every path in the engine's greedy rounds under ``policy``, all paths in lockstep as one batch
    (see the module docstring): each iteration is one round of every unfinished path, the trigger over a
    [A, k] block, acceptance over the flat rows of the escalated blocks, both through ``cascade.round``
    as in the engine. Includes early stops of drafting (``stops_drafting``) and the last block, which ends
    the request (the path's end: its EOS, the token that completed a stop string, or the max_tokens-th
    token) and so has no bonus position. The paths are independent: walking them together or one at a
    time gives the same results."""
    from cascade.verification import VerifyStats

    batch = paths if isinstance(paths, PathBatch) else PathBatch(paths)
    N, k = len(batch), policy.k
    if N == 0:
        return []
    L, width, flat_t, has_router = batch.length, batch.width, batch.flat, batch.has_router
    pos = torch.zeros(N, dtype=torch.int64)  # round 1 feeds only the prompt (prefill, counted apart)
    target_len = torch.zeros(N, dtype=torch.int64)
    pending = torch.zeros(N, dtype=torch.int64)
    stateful = has_fields(policy.State)
    state = initial_batch(policy, N) if stateful else None  # every path's policy state, as the engine's
    #   Sequence.policy_state (``cascade.policies.state``)
    draft_tokens, target_tokens, scored, escalations, resolved = (torch.zeros(N, dtype=torch.int64) for _ in range(5))
    diverged = torch.full((N,), -1, dtype=torch.int64)
    first = torch.full((3, N), -1, dtype=torch.int64)  # draft tokens, target tokens, escalations at the first emission
    ar = torch.arange(k)
    plans = stateful and type(policy).plan is not Policy.plan  # its requests' rounds depend on their state
    alone_steps = torch.zeros(N, dtype=torch.int64)
    stateless = torch.zeros(N, dtype=torch.int64)  # answer positions held after each target pass, summed
    while True:
        act = (pos < L).nonzero().squeeze(1)  # [A] paths with a round left
        if plans and act.numel():  # paths whose plan lets the target decode alone: walked to their end at once
            alone = torch.tensor([not policy.plan(s).drafts for s in unstack(take(state, act))], dtype=torch.bool)
            if bool(alone.any()):
                done = act[alone]
                m = L[done] - pos[done]  # [D] tokens left, one target pass each
                rest = torch.arange(width)[None, :]
                rest = (rest >= pos[done][:, None]) & (rest < L[done][:, None])  # [D, width]
                mis = flat_t["mis_pa"].view(N, width)[done] & rest
                here = torch.where(mis.any(dim=1), mis.int().argmax(dim=1), -1)
                diverged[done] = torch.where((diverged[done] < 0) & (here >= 0), here, diverged[done])
                resolved[done] += (flat_t["disagree"].view(N, width)[done] & rest).sum(dim=1)
                catch_up = pos[done] - target_len[done]  # the first alone pass reads the streamed tokens
                now = first[0, done] < 0  # (a first token from the target alone: its first pass)
                first[:, done] = torch.where(now, torch.stack([draft_tokens[done], target_tokens[done] + catch_up,
                                                               escalations[done] + 1]), first[:, done])
                target_tokens[done] += catch_up + m - 1  # then one new token per pass
                stateless[done] += m * pos[done] + m * (m - 1) // 2  # pass j ends holding pos + j answer positions
                scored[done] += m
                alone_steps[done] += m
                pos[done] = L[done]
                act = act[~alone]
        if act.numel() == 0:
            break
        A, p, La = act.numel(), pos[act], L[act]
        n = torch.clamp(La - p, max=k)  # [A] drafted this round
        drafted_fed = n - 1  # [A] block tokens the draft's decode steps were fed (before any early stop)
        cols = p[:, None] + ar[None, :]  # [A, k] answer positions of the block
        flat = act[:, None] * width + cols  # [A, k] the same positions in the flattened [N * width] tensors
        g = {name: flat_t[name][flat] for name in ("q_max", "q_margin", "q_entropy", "p_max", "tv", "logp_x", "q_argmax",
                                                   "p_argmax", "mis_x", "mis_pa", "disagree") + (("router_score",) if has_router else ())}
        group = PolicyGroup(policy, None, take(state, act) if stateful else None)
        if policy.stops_drafting:  # its early stop (BiLD's fallback) after a position before the block's last
            n = block_lengths(drafting_stops(g["q_max"], [group]) & (ar[None, :] < (n - 1)[:, None]), n)
        valid = ar[None, :] < n[:, None]  # [A, k]
        draft_tokens[act] += pending[act] + n - 1
        zero = torch.zeros(())
        conf = BlockConfidence(
            max_prob=torch.where(valid, g["q_max"], zero), margin=torch.where(valid, g["q_margin"], zero),
            entropy=torch.where(valid, g["q_entropy"], zero),
            token_logprob=torch.where(valid, g["q_max"].clamp_min(1e-30).log(), zero), valid=valid, drafted=n,
            catch_up=p - target_len[act], router=torch.where(valid, g["router_score"], zero) if has_router else None,
        )
        keep, esc = run_triggers(conf, [group])
        ends_request = (keep == n) & (p + n == La)
        fed, num_logits = target_layout(keep, ends_request)
        escalations[act] += esc.long()
        target_tokens[act] += torch.where(esc, p - target_len[act] + fed, 0)
        stateless[act] += torch.where(esc, p + fed, 0)
        scored[act] += torch.where(esc, num_logits, 0)
        verified = torch.where(esc, keep, 0)  # [A] rows each path sends to acceptance
        rows = ar[None, :] < verified[:, None]  # [A, k], row-major = the flat layout's order
        n_acc = verified
        if bool(rows.any()):
            xa, paa = g["q_argmax"], g["p_argmax"]
            v = VerifyStats(
                q_token=torch.ones(int(rows.sum())), p_token=(xa == paa).float()[rows], max_q=g["q_max"][rows],
                max_p=g["p_max"][rows], tv=g["tv"][rows], logp_token=g["logp_x"][rows], residual_token=paa[rows],
                target_token=paa[rows], token=xa[rows])
            _, accept = rule_acceptance(policy, v)
            n_acc = accepted_counts(accept, torch.full_like(accept, 0.5), verified)
        drafted_out = torch.where(esc, n_acc, keep)  # [A] draft tokens emitted from the block's start
        extra_at = p + n_acc  # an escalation's target token (replacement or bonus), if inside the path
        has_extra = esc & (extra_at < La)
        extra_flat = act * width + extra_at.clamp(max=width - 1)
        # where the walk leaves the recorded answer, and which disagreements it resolved to the target
        first_x = first_true(g["mis_x"] & (ar[None, :] < drafted_out[:, None]), torch.full((A,), k))
        extra_mis = has_extra & flat_t["mis_pa"][extra_flat]
        here = torch.where(first_x < k, p + first_x, torch.where(extra_mis, extra_at, -1))
        diverged[act] = torch.where((diverged[act] < 0) & (here >= 0), here, diverged[act])
        resolved[act] += (has_extra & flat_t["disagree"][extra_flat]).long()
        emitted = torch.where(esc, n_acc + has_extra.long(), keep)  # [A] tokens this round emitted
        if stateful:
            outcome = RoundOutcome(esc, emitted, _emitted_logprobs(flat_t, act * width, p, esc, keep, n_acc, emitted, width))
            put(state, act, next_states([group], outcome)[0])
        now = (first[0, act] < 0) & (emitted > 0)  # [A] paths whose first token this round emitted
        first[:, act] = torch.where(now, torch.stack([draft_tokens[act], target_tokens[act], escalations[act]]), first[:, act])
        # the draft's catch-up next round: what this round emitted beyond what its cache keeps (the engine's rule)
        pending[act] = emitted - draft_cache_keeps(drafted_fed, drafted_out, emitted)
        target_len[act] = torch.where(esc, p + n_acc, target_len[act])
        pos[act] = torch.where(esc, extra_at + 1, p + keep)
    disagreements = flat_t["disagree"].view(N, width).sum(1)  # zero past each path's end
    totals = torch.stack([draft_tokens, target_tokens, escalations + alone_steps])
    first = torch.where(first < 0, totals, first)  # a path that never emitted: its whole walk
    return [WalkResult(int(draft_tokens[i]), int(target_tokens[i]), int(scored[i]), int(escalations[i]),
                       None if int(diverged[i]) < 0 else int(diverged[i]), int(disagreements[i]), int(resolved[i]),
                       int(first[0, i]), int(first[1, i]), int(first[2, i]), int(alone_steps[i]), int(stateless[i]))
            for i in range(N)]


def _emitted_logprobs(flat_t: dict[str, torch.Tensor], base: torch.Tensor, p: torch.Tensor, esc: torch.Tensor,
                      keep: torch.Tensor, n_acc: torch.Tensor, emitted: torch.Tensor, width: int) -> torch.Tensor:
    """-> [A, k + 1]: the natural log-prob of each token a greedy round emitted, as the engine's records give it
    (a drafted token kept unverified: log q(x) = log max q; an accepted verified one: log p(x); the
    escalation's replacement or bonus token, the target's argmax: log max p), 0 past ``emitted``. ``base``
    [A]: each path's first flat index, ``p`` [A] the round's first answer position."""
    j = torch.arange(int(keep.max()) + 2 if keep.numel() else 1).view(1, -1)
    flat = base[:, None] + (p[:, None] + j).clamp(max=width - 1)
    log_q = flat_t["q_max"][flat].clamp_min(1e-30).log()
    verified = torch.where(j < n_acc[:, None], flat_t["logp_x"][flat], flat_t["p_max"][flat].clamp_min(1e-30).log())
    lp = torch.where(esc[:, None], verified, log_q)
    return torch.where(j < emitted[:, None], lp, torch.zeros(()))


def simulate(policy: Policy, path: PathStats) -> WalkResult:
    """One path's walk (``simulate_paths`` of a batch of one)."""
    return simulate_paths(policy, [path])[0]


@contextmanager
def one_intra_op_thread():
    """Run the block with one torch intra-op thread, then restore the caller's count. A replay walk is many ops on
    tensors of a few hundred elements: extra intra-op threads only add wake-ups, and while another process holds
    the cores (a recording beside a sweep) the parallel kernels among them (``repeat_interleave``) wait for a core
    each time: ``accepted_counts`` measured 70 us with one thread, 860 us with two, on a 2-core EPYC beside a
    recording."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ReplaySet:
    """The recorded answers of a set of problems, stacked once (``PathBatch``), replayed under any number
    of policies: ``records(policy)`` walks all draft answers in one batch, then the target answers of the
    problems whose walk left the draft's. ``target_paths`` entries may be None (no target answer)."""

    def __init__(self, problems, draft_paths: Sequence[PathStats], target_paths: Sequence[PathStats | None],
                 draft_correct: Sequence[float], target_correct: Sequence[float]) -> None:
        if not len(problems) == len(draft_paths) == len(target_paths) == len(draft_correct) == len(target_correct):
            raise ValueError("replay: problems, paths and correctness differ in length")
        self.problems, self.draft_paths, self.target_paths = list(problems), list(draft_paths), list(target_paths)
        self.draft_correct, self.target_correct = list(draft_correct), list(target_correct)
        self._draft = PathBatch(self.draft_paths)
        self._with_target = [i for i, tp in enumerate(self.target_paths) if tp is not None]
        self._target_row = {i: r for r, i in enumerate(self._with_target)}
        self._target = PathBatch([self.target_paths[i] for i in self._with_target])

    def records(self, policy: Policy) -> list["RunRecord"]:
        on_draft = simulate_paths(policy, self._draft)
        redo = [i for i, w in enumerate(on_draft) if w.diverged_at is not None and i in self._target_row]
        on_target = dict(zip(redo, simulate_paths(policy, self._target.rows([self._target_row[i] for i in redo]))))
        return [_record(policy, self.problems[i], self.draft_paths[i], self.target_paths[i], self.draft_correct[i],
                        self.target_correct[i], on_draft[i], on_target.get(i)) for i in range(len(on_draft))]


def replay_records(policy: Policy, problems, draft_paths: Sequence[PathStats],
                   target_paths: Sequence[PathStats | None], draft_correct: Sequence[float],
                   target_correct: Sequence[float]) -> list["RunRecord"]:
    """``replay_record`` of every problem, the walks batched (``ReplaySet``; build one to replay many policies)."""
    return ReplaySet(problems, draft_paths, target_paths, draft_correct, target_correct).records(policy)


def replay_record(policy: Policy, problem, draft_path: PathStats, target_path: PathStats | None,
                  draft_correct: float, target_correct: float) -> "RunRecord":
    """One replayed RunRecord for ``policy`` on ``problem`` from the recorded answers (the target's answer
    is optional: without it, a walk that leaves the draft's answer is always an estimate)."""
    return replay_records(policy, [problem], [draft_path], [target_path], [draft_correct], [target_correct])[0]


def _record(policy: Policy, problem, draft_path: PathStats, target_path: PathStats | None, draft_correct: float,
            target_correct: float, on_draft: WalkResult, on_target: WalkResult | None) -> "RunRecord":
    """The record of one problem from its walks (``on_target``: the walk on the target's answer, None where
    the draft's walk never left the draft's answer or there is no target answer)."""
    from cascade.bench.runs import RunRecord

    if on_draft.diverged_at is None:
        walk, path, mode, correct = on_draft, draft_path, "replay-exact", draft_correct
    elif on_target is not None and on_target.diverged_at is None:
        walk, path, mode, correct = on_target, target_path, "replay-target-path", target_correct
    else:
        share = on_draft.resolved_to_target / max(1, on_draft.disagreements)
        walk, path, mode = on_draft, draft_path, "replay-estimate"
        correct = draft_correct + (target_correct - draft_correct) * share
    return RunRecord(
        dataset=problem.dataset, problem_id=problem.problem_id, policy=policy.describe(), correct=float(correct),
        emitted_tokens=path.emitted, prompt_tokens=path.prompt_tokens, draft_tokens=walk.draft_tokens,
        draft_prefill_tokens=path.prompt_tokens, target_tokens=walk.target_tokens,
        target_prefill_tokens=path.prompt_tokens if walk.escalations + walk.target_alone_steps else 0,
        escalations=walk.escalations, target_passes=walk.escalations + walk.target_alone_steps,
        target_scored_tokens=walk.target_scored_tokens,
        target_stateless_tokens=(walk.escalations + walk.target_alone_steps) * path.prompt_tokens
        + walk.stateless_answer_tokens,
        mode=mode, extra={"diverged_at": on_draft.diverged_at},
        first_token={"draft_tokens": walk.first_draft_tokens, "draft_prefill_tokens": path.prompt_tokens,
                     "target_tokens": walk.first_target_tokens,
                     "target_prefill_tokens": path.prompt_tokens if walk.first_escalations else 0,
                     "target_passes": walk.first_escalations},
    )
