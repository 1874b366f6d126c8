"""Recorded answers: what the replay walks. For one problem and one answer the pair really produced (the draft-only
or the target-only answer), both models read prompt + answer in one forward pass each (``record_path``); at every
answer position ``PathStats`` keeps what the policies read in a greedy round: the draft's proposal ``x = argmax q``
and its confidence (max q, margin, entropy), the target's ``argmax p``, ``max p``, ``TV(p, q)`` and ``log p(x)``.

Also here: the cache key of a recorded path (``path_key``), and the learned router's view of a path (its features,
labels and scores: ``path_features``, ``path_labels``, ``score_paths``). Simulating policies on recorded paths is
``cascade.bench.replay``'s job.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

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
    record_s: float = 0.0  # seconds the recording took (both teacher-forced passes), for the report

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
                eos_token_ids: Iterable[int], path_model: str, row: int = 0, trace: dict | None = None) -> PathStats:
    """Teacher-force prompt + answer through both runners (one forward pass each) on cache ``row``, which
    must be free; it is freed again afterwards. ``path_model`` ("draft" | "target") says whose answer it is:
    its argmax after the last token decides which EOS token ended the answer.

    ``trace``: the answer's own model's statistics, kept while it was decoded (``cascade.trace``, from
    ``PolicyRunner.run(trace=True)``). Then only the other model reads the answer: one pass instead of two.
    The traced figures are the decode's (fp32: within ~1e-6 of a teacher-forced pass's, the difference the
    engine's own rounds have). Where a target trace's top alternatives miss the draft's token somewhere
    (log p(x) unknown), the target reads the answer too; a trace that does not match the answer is not used
    (both passes)."""
    t_start = time.perf_counter()
    prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
    path = None
    if trace is not None and trace.get("model") == path_model and _trace_fits(trace, answer_ids, ended_on_eos, eos_token_ids):
        path = _path_from_trace(draft, target, prompt_ids, answer_ids, trace, row)
    if path is None:
        path = _path_teacher_forced(draft, target, prompt_ids, answer_ids, ended_on_eos, eos_token_ids, path_model, row)
    path.record_s = time.perf_counter() - t_start
    return path


def _forward(runner, row: int, span: list[int], n: int) -> torch.Tensor:
    """[n, V] fp32 logits of the last n positions of ``span``, teacher-forced on a free ``row`` (freed after)."""
    try:
        return runner.forward_span([row], [span], num_logits=[n]).float()
    finally:
        runner.free([row])


def _path_teacher_forced(draft, target, prompt_ids, answer_ids, ended_on_eos, eos_token_ids, path_model, row) -> PathStats:
    from cascade.confidence import confidence_stats
    from cascade.verification import verify_stats

    n = len(answer_ids) + 1
    span = prompt_ids + answer_ids
    q_logits = _forward(draft, row, span, n)  # [n, V]
    p_logits = _forward(target, row, span, n).to(q_logits.device)  # [n, V]
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


def _trace_fits(trace: dict, answer_ids: list[int], ended_on_eos: bool, eos_token_ids: Iterable[int]) -> bool:
    """The trace covers exactly the answer, plus the EOS it ended on (an answer a stop string or max_tokens
    ended has none)."""
    tokens = trace.get("tokens", [])
    if tokens[: len(answer_ids)] != answer_ids:
        return False
    extra = tokens[len(answer_ids):]
    return extra == [] or (ended_on_eos and len(extra) == 1 and extra[0] in set(eos_token_ids))


def _path_from_trace(draft, target, prompt_ids, answer_ids, trace: dict, row: int) -> PathStats | None:
    """The path from the answer's own traced statistics and one teacher-forced pass of the other model."""
    from cascade.confidence import confidence_stats

    tokens = list(trace["tokens"])
    L, span = len(tokens), prompt_ids + answer_ids
    if trace["model"] == "draft":  # the draft wrote it: x = the drafted token; the target reads it
        p_logits = _forward(target, row, span, len(answer_ids) + 1)[:L]  # [L, V]
        pc = confidence_stats(p_logits, 0.0)
        x = torch.tensor(tokens, dtype=torch.int64, device=p_logits.device)
        logp_x = torch.log_softmax(p_logits, dim=-1).gather(1, x.view(L, 1)).squeeze(1)
        p_argmax = pc.argmax.tolist()
        return PathStats(
            tokens=tokens, emitted=len(answer_ids), prompt_tokens=len(prompt_ids), q_argmax=tokens,
            q_max=list(trace["max_prob"]), q_margin=list(trace["margin"]), q_entropy=list(trace["entropy"]),
            p_argmax=p_argmax, p_max=pc.max_prob.tolist(), tv=[float(a != b) for a, b in zip(tokens, p_argmax)],
            logp_x=logp_x.tolist())
    # the target wrote it: p's argmax and max are the decode's; the draft reads it; log p(x) from the top list
    q_logits = _forward(draft, row, span, len(answer_ids) + 1)[:L]
    qc = confidence_stats(q_logits, 0.0)
    q_argmax = qc.argmax.tolist()
    logp_x = []
    for j, x in enumerate(q_argmax):
        if x == tokens[j]:
            logp_x.append(float(trace["logprob"][j]))
        elif x in trace["top_ids"][j]:
            logp_x.append(float(trace["top_logprobs"][j][trace["top_ids"][j].index(x)]))
        else:  # outside the target's top alternatives somewhere: log p(x) from the target's own pass
            p_logits = _forward(target, row, span, len(answer_ids) + 1)[:L].to(q_logits.device)
            logp_x = torch.log_softmax(p_logits, dim=-1).gather(1, qc.argmax.view(L, 1)).squeeze(1).tolist()
            break
    return PathStats(
        tokens=tokens, emitted=len(answer_ids), prompt_tokens=len(prompt_ids), q_argmax=q_argmax,
        q_max=qc.max_prob.tolist(), q_margin=qc.margin.tolist(), q_entropy=qc.entropy.tolist(),
        p_argmax=tokens, p_max=[math.exp(lp) for lp in trace["logprob"]],
        tv=[float(a != b) for a, b in zip(q_argmax, tokens)], logp_x=logp_x)


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


def path_key(pair_fingerprint: str, problem_key: str, path_model: str, answer_ids: Sequence[int]) -> str:
    blob = json.dumps([REPLAY_VERSION, pair_fingerprint, problem_key, path_model, list(answer_ids)])
    return "replay-" + hashlib.sha256(blob.encode()).hexdigest()


__all__ = ["REPLAY_VERSION", "PathStats", "path_features", "path_key", "path_labels", "record_path", "score_paths"]
