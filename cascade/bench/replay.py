"""Replay: sweep a policy's thresholds from statistics recorded once, by teacher forcing, instead of
generating again for every threshold.

Recording (``record_path``): for one problem and one answer the pair really produced (the draft-only or
the target-only answer), both models read prompt + answer in one forward pass each; at every answer
position we keep what the policies read in a greedy round: the draft's proposal ``x = argmax q`` and its
confidence (max q, margin, entropy), the target's ``argmax p``, ``max p``, ``TV(p, q)`` and ``log p(x)``.

Simulation (``simulate``) walks the recorded answer in the engine's rounds, calling the policy's own
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

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from cascade.policies import BlockConfidence, Policy
from cascade.round import accepted_counts, settle_trigger, target_layout

if TYPE_CHECKING:
    from cascade.bench.runs import RunRecord

REPLAY_VERSION = 2  # 2: TV between the sampling distributions (one-hot on greedy rows)


@dataclass
class PathStats:
    """Per-position statistics along one recorded answer (greedy rule statistics, T = 1).

    Position j is the prediction of ``tokens[j]`` from prompt + ``tokens[:j]``. ``tokens`` ends with the
    EOS token when the answer ended on one (processed by the engine, not emitted)."""

    tokens: list[int]
    emitted: int  # answer tokens returned to the caller (EOS excluded)
    prompt_tokens: int
    q_argmax: list[int]  # the draft's greedy proposal x
    q_max: list[float]
    q_margin: list[float]
    q_entropy: list[float]
    p_argmax: list[int]
    p_max: list[float]
    tv: list[float]
    logp_x: list[float]  # log p(x), the target's T = 1 log-prob of the draft's proposal
    router_score: list[float] | None = None  # the learned router's P(target disagrees) per position, set by
    #   ``score_paths`` (not recorded: it depends on the router, not on the pair)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("router_score")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "PathStats":
        return cls(**d)

    def __len__(self) -> int:
        return len(self.tokens)


@torch.no_grad()
def record_path(draft, target, prompt_ids: Sequence[int], answer_ids: Sequence[int], *, ended_on_eos: bool,
                eos_token_ids: Iterable[int], path_model: str, row: int = 0) -> PathStats:
    """Teacher-force prompt + answer through both runners (one forward pass each) on cache ``row``, which
    must be free; it is freed again afterwards. ``path_model`` ("draft" | "target") says whose answer it is:
    its argmax after the last token decides which EOS token ended the answer."""
    from cascade.confidence import confidence_stats
    from cascade.verification import verify_stats

    prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
    n = len(answer_ids) + 1
    span = prompt_ids + answer_ids
    try:
        q_logits = draft.forward_span([row], [span], num_logits=[n]).float()  # [n, V]
        p_logits = target.forward_span([row], [span], num_logits=[n]).float().to(q_logits.device)  # [n, V]
    finally:
        draft.free([row])
        target.free([row])
    owner = q_logits if path_model == "draft" else p_logits
    tokens = list(answer_ids)
    last = int(owner[-1].argmax())
    if ended_on_eos and last in set(eos_token_ids):
        tokens.append(last)
    L = len(tokens)
    q_logits, p_logits = q_logits[:L], p_logits[:L]
    qc = confidence_stats(q_logits, 0.0)
    pc = confidence_stats(p_logits, 0.0)
    v = verify_stats(q_logits, p_logits, qc.argmax, 0.0, torch.zeros(L, dtype=torch.int64))
    return PathStats(
        tokens=tokens, emitted=len(answer_ids), prompt_tokens=len(prompt_ids),
        q_argmax=qc.argmax.tolist(), q_max=qc.max_prob.tolist(), q_margin=qc.margin.tolist(),
        q_entropy=qc.entropy.tolist(), p_argmax=pc.argmax.tolist(), p_max=pc.max_prob.tolist(),
        tv=v.tv.tolist(), logp_x=v.logp_token.tolist(),
    )


def path_features(path: PathStats) -> torch.Tensor:
    """[L, F] router features of every position of a recorded answer (greedy: log q(x) = log max q)."""
    from cascade.router import router_features

    q = torch.tensor(path.q_max)
    return router_features(q, torch.tensor(path.q_margin), torch.tensor(path.q_entropy), q.clamp_min(1e-30).log())


def path_labels(path: PathStats) -> torch.Tensor:
    """[L] 1 where the target's greedy token differs from the draft's (the router's training label)."""
    return (torch.tensor(path.q_argmax) != torch.tensor(path.p_argmax)).long()


def score_paths(router, paths: Iterable[PathStats]) -> None:
    """Attach the router's score of every position to each path (``PathStats.router_score``), so replayed
    ``learned`` policies read what the engine would."""
    for path in paths:
        path.router_score = torch.sigmoid(router.logits(path_features(path))).cpu().tolist()
        path.__dict__.pop("_tensors", None)


def path_key(pair_fingerprint: str, problem_key: str, path_model: str, answer_ids: Sequence[int]) -> str:
    blob = json.dumps([REPLAY_VERSION, pair_fingerprint, problem_key, path_model, list(answer_ids)])
    return "replay-" + hashlib.sha256(blob.encode()).hexdigest()


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


def _tensors(path: PathStats) -> dict[str, torch.Tensor]:
    """The path's per-position lists as tensors, built once per path (a sweep walks it hundreds of times)."""
    cached = path.__dict__.get("_tensors")
    if cached is None:
        x = torch.tensor(path.q_argmax, dtype=torch.int64)
        pa = torch.tensor(path.p_argmax, dtype=torch.int64)
        q = torch.tensor(path.q_max)
        cached = {"x": x, "pa": pa, "agree": (x == pa).float(), "q_max": q, "q_log": q.clamp_min(1e-30).log(),
                  "q_margin": torch.tensor(path.q_margin), "q_entropy": torch.tensor(path.q_entropy),
                  "p_max": torch.tensor(path.p_max), "tv": torch.tensor(path.tv), "logp_x": torch.tensor(path.logp_x),
                  "router": torch.tensor(path.router_score) if path.router_score is not None else None}
        path.__dict__["_tensors"] = cached
    return cached


def _verify_rows(path: PathStats, lo: int, hi: int):
    """VerifyStats of greedy rows lo..hi-1 (q/p sampling distributions are one-hot at their argmax)."""
    from cascade.verification import VerifyStats

    t = _tensors(path)
    return VerifyStats(
        q_token=torch.ones(hi - lo), p_token=t["agree"][lo:hi], max_q=t["q_max"][lo:hi], max_p=t["p_max"][lo:hi],
        tv=t["tv"][lo:hi], logp_token=t["logp_x"][lo:hi], residual_token=t["pa"][lo:hi], target_token=t["pa"][lo:hi],
        token=t["x"][lo:hi],
    )


def _block_confidence(path: PathStats, lo: int, hi: int, catch_up: int, window_left: float) -> BlockConfidence:
    t = _tensors(path)
    return BlockConfidence(
        max_prob=t["q_max"][lo:hi].unsqueeze(0), margin=t["q_margin"][lo:hi].unsqueeze(0),
        entropy=t["q_entropy"][lo:hi].unsqueeze(0), token_logprob=t["q_log"][lo:hi].unsqueeze(0),
        valid=torch.ones(1, hi - lo, dtype=torch.bool), drafted=torch.tensor([hi - lo]),
        catch_up=torch.tensor([catch_up]), window_left=torch.tensor([window_left], dtype=torch.float32),
        router=t["router"][lo:hi].unsqueeze(0) if t["router"] is not None else None,
    )


def greedy_acceptance(policy: Policy, v) -> torch.Tensor:
    """-> accept [R] acceptance probabilities of greedy rows through the policy's own rule (0 or 1 there)."""
    return policy.acceptance(v, policy.deferral(v).float()).float()


def simulate(policy: Policy, path: PathStats) -> WalkResult:
    """Walk ``path`` in the engine's greedy rounds under ``policy`` (see the module docstring), including
    early stops of drafting (``stops_drafting``) and the last block, which ends the request (the path's
    end: its EOS, the token that completed a stop string, or the max_tokens-th token) and so has no bonus
    position."""
    L = len(path)
    pos, target_len, pending_draft = 0, 0, 0  # round 1 feeds only the prompt (prefill, counted apart)
    window_left = 0.0  # the policy's state between rounds (``Policy.window_after``), as Sequence.window_left
    draft_tokens = target_tokens = scored = escalations = 0
    diverged: int | None = None
    resolved = 0

    def emit(j: int, token: int) -> None:
        nonlocal diverged, resolved
        if path.q_argmax[j] != path.p_argmax[j] and token == path.p_argmax[j]:
            resolved += 1
        if diverged is None and token != path.tokens[j]:
            diverged = j

    while pos < L:
        n = min(policy.k, L - pos)
        if policy.stops_drafting:
            for j in range(n - 1):
                stop = policy.stop_drafting(torch.tensor([path.q_max[pos + j]]))
                if stop is not None and bool(stop[0]):
                    n = j + 1
                    break
        draft_tokens += pending_draft + n - 1
        conf = _block_confidence(path, pos, pos + n, pos - target_len, window_left)
        keep_t, esc_t = settle_trigger(*policy.trigger(conf), conf.drafted)
        keep = int(keep_t[0])

        def carry_window(emitted: int) -> float:
            if not policy.keeps_window:
                return 0.0
            return float(policy.window_after(conf.window_left, esc_t, torch.tensor([emitted]))[0])

        if not bool(esc_t[0]):
            for j in range(pos, pos + keep):
                emit(j, path.q_argmax[j])
            pending_draft = 1 if keep == n else 0
            window_left = carry_window(keep)
            pos += keep
            continue
        ends_request = keep == n and pos + n == L  # the path's end: its EOS, stop string or max_tokens-th token
        fed, num_logits = target_layout(keep_t, torch.tensor([ends_request]))
        escalations += 1
        target_tokens += (pos - target_len) + int(fed[0])
        scored += int(num_logits[0])
        n_acc = 0
        if keep:
            accept = greedy_acceptance(policy, _verify_rows(path, pos, pos + keep))
            n_acc = int(accepted_counts(accept, torch.full_like(accept, 0.5), keep_t)[0])
        for j in range(pos, pos + n_acc):
            emit(j, path.q_argmax[j])
        extra = pos + n_acc
        if extra < L:
            emit(extra, path.p_argmax[extra])
        target_len = pos + n_acc
        pending_draft = 2 if n_acc == n else 1  # the draft cache lags by d_n and the extra token only after a whole block
        window_left = carry_window(n_acc + (extra < L))
        pos = extra + 1
    disagreements = sum(1 for a, b in zip(path.q_argmax, path.p_argmax) if a != b)
    return WalkResult(draft_tokens, target_tokens, scored, escalations, diverged, disagreements, resolved)


def replay_record(policy: Policy, problem, draft_path: PathStats, target_path: PathStats | None,
                  draft_correct: float, target_correct: float) -> "RunRecord":
    """One replayed RunRecord for ``policy`` on ``problem`` from the recorded answers (the target's answer
    is optional: without it, a walk that leaves the draft's answer is always an estimate)."""
    from cascade.bench.runs import RunRecord

    on_draft = simulate(policy, draft_path)
    if on_draft.diverged_at is None:
        walk, path, mode, correct = on_draft, draft_path, "replay-exact", draft_correct
    else:
        on_target = simulate(policy, target_path) if target_path is not None else None
        if on_target is not None and on_target.diverged_at is None:
            walk, path, mode, correct = on_target, target_path, "replay-target-path", target_correct
        else:
            share = on_draft.resolved_to_target / max(1, on_draft.disagreements)
            walk, path, mode = on_draft, draft_path, "replay-estimate"
            correct = draft_correct + (target_correct - draft_correct) * share
    return RunRecord(
        dataset=problem.dataset, problem_id=problem.problem_id, policy=policy.describe(), correct=float(correct),
        emitted_tokens=path.emitted, prompt_tokens=path.prompt_tokens, draft_tokens=walk.draft_tokens,
        draft_prefill_tokens=path.prompt_tokens, target_tokens=walk.target_tokens,
        target_prefill_tokens=path.prompt_tokens if walk.escalations else 0, escalations=walk.escalations,
        target_scored_tokens=walk.target_scored_tokens,
        mode=mode, extra={"diverged_at": on_draft.diverged_at},
    )
