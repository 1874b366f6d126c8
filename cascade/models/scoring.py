"""What a target that lives outside this process returns for one verification, and how it becomes logits.

A served target (vLLM in this process, a stock ``vllm serve``, or ``cascade target-serve``'s verify
endpoint) is asked for the next-token distribution at the last ``n`` positions of each row's sequence
(the drafted block and the bonus position). It answers, per position, either the top-k log-probs (plus
the log-prob of the token actually there, as vLLM's prompt log-probs do) or the whole row of log-probs
(``dense``: exact for every policy). ``ScoringBackend`` is the seam: ``VLLMRunner`` turns any backend
into a ``ModelRunner``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

FULL_ROWS = -1  # ``k`` that asks for the whole row of log-probs instead of the top-k


@dataclass
class ScoredPositions:
    """Log-probs of the next token at the last ``n`` positions of one prompt, in order: entry j is the
    distribution after token ``L - n + j`` (so the last entry is the one after the whole prompt).

    Either sparse (``ids`` / ``logprobs``: top-k per position, plus the token there) or ``dense``."""

    ids: list[list[int]]  # [n][<= k + 1] token ids (empty when dense)
    logprobs: list[list[float]]  # [n][<= k + 1] natural log-probs, same order as ids (empty when dense)
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache
    dense: torch.Tensor | None = None  # [n, V] float32 log-probs of every token, when the whole row was asked

    @property
    def positions(self) -> int:
        return int(self.dense.shape[0]) if self.dense is not None else len(self.ids)


class ScoringBackend(Protocol):
    """Where the target's log-probs come from."""

    max_len: int  # longest sequence the backend accepts

    def score(self, prompts: Sequence[Sequence[int]], last_n: Sequence[int], k: int) -> list[ScoredPositions]:
        """For each prompt, the log-probs of its last ``last_n[i]`` positions: the top-k (``k >= 1``) or the
        whole rows (``k == FULL_ROWS``). Raises ``TargetUnavailable`` when the target cannot be reached."""
        ...

    def close(self) -> None:
        ...


def topk_to_logits(scored: Sequence[ScoredPositions], vocab_size: int) -> torch.Tensor:
    """Dense float32 logits ``[sum(n_i), V]``: a dense answer as it is, a sparse one as its log-probs at
    their ids and ``-inf`` elsewhere (softmax of such a row is the top-k truncation of p, renormalised)."""
    n = sum(s.positions for s in scored)
    out = torch.full((n, vocab_size), float("-inf"), dtype=torch.float32)
    r = 0
    for s in scored:
        if s.dense is not None:
            width = min(vocab_size, s.dense.shape[1])
            out[r:r + s.positions, :width] = s.dense[:, :width]
            r += s.positions
            continue
        for ids, lps in zip(s.ids, s.logprobs):
            out[r, torch.tensor(ids, dtype=torch.int64)] = torch.tensor(lps, dtype=torch.float32)
            r += 1
    return out


def truncate_to_topk(logits: torch.Tensor, k: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """What a top-k target returns for full ``logits [n, V]``: the top-k log-probs (plus the log-prob of
    ``tokens [n]`` where given, as vLLM's prompt log-probs include the actual token) and ``-inf`` elsewhere.
    Used to measure the top-k approximation against an in-process runner, and by the verify endpoint."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = torch.zeros_like(logp, dtype=torch.bool)
    keep.scatter_(1, logp.topk(min(k, logp.shape[-1]), dim=-1).indices, True)
    if tokens is not None:
        keep.scatter_(1, tokens.view(-1, 1).to(torch.int64), True)
    return torch.where(keep, logp, torch.full_like(logp, float("-inf")))


def scored_from_logits(logits: torch.Tensor, next_tokens: Sequence[int], k: int, cached_tokens: int = 0) -> ScoredPositions:
    """One prompt's answer from its full ``logits [n, V]``: dense log-probs for ``k == FULL_ROWS``, else the
    top-k of each position plus the log-prob of ``next_tokens[j]`` (the token at position j + 1; the last
    position has none, so ``len(next_tokens) == n - 1``), as vLLM's prompt log-probs give them."""
    if k == FULL_ROWS:
        return ScoredPositions(ids=[], logprobs=[], cached_tokens=cached_tokens,
                               dense=torch.log_softmax(logits.float(), dim=-1))
    n = logits.shape[0]
    if len(next_tokens) != n - 1:
        raise ValueError(f"next_tokens: {len(next_tokens)} tokens for {n} positions (need n - 1)")
    trunc = truncate_to_topk(logits, k, torch.tensor(list(next_tokens) + [0], dtype=torch.int64))
    if n:
        trunc[-1] = truncate_to_topk(logits[-1:], k)[0]  # after the last token nothing is there yet
    ids = [torch.isfinite(row).nonzero().squeeze(1).tolist() for row in trunc]
    return ScoredPositions(ids=ids, logprobs=[trunc[i, ids[i]].tolist() for i in range(n)], cached_tokens=cached_tokens)


__all__ = ["FULL_ROWS", "ScoredPositions", "ScoringBackend", "scored_from_logits", "topk_to_logits", "truncate_to_topk"]
