"""A ``ScoringBackend`` on the project's own runner, its KV rows used as a prefix cache.

``cascade target-serve --target DIR`` serves the verify endpoint from this: each call's sequences go to
the rows whose cached tokens share the longest prefix with them (the rest least-recently used first), the
row is cut back to that shared prefix (``truncate``: a length update, nothing recomputed) and only the
remainder runs, in one ragged ``forward_span`` for the whole call, with logits at the positions asked.
A cascade front end sends each row's whole sequence on every verification, so a verification after the
first costs its new positions, as with the in-process target.

Reuse never covers a position whose log-probs are asked for (those are computed, not read), so answers do
not depend on what was cached beyond the float rounding of a different chunking.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

from cascade.models.base import ModelRunner
from cascade.models.scoring import ScoredPositions, scored_from_logits


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists: list comparisons (C loops), the usual case
    (one holds a prefix of the other) in one, else a binary search over prefix lengths."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo] holds, a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class PrefixCacheStats:
    """Token counts since start-up, as vLLM counts its prefix cache (queries: prompt tokens looked up;
    hits: tokens served from the cache)."""

    calls: int = 0
    sequences: int = 0
    queries: int = 0
    hits: int = 0
    positions_scored: int = 0  # positions whose log-probs were returned


class RunnerScorer:
    """Scores token sequences on ``runner`` (a ``ModelRunner``), reusing what its rows hold. Thread-safe:
    calls run one at a time."""

    def __init__(self, runner: ModelRunner, *, max_top_k: int = 20, full_rows: bool = True) -> None:
        self.runner = runner
        self.full_rows = bool(full_rows)  # whether a call may ask for whole rows (top_k -1)
        self.max_len = int(runner.max_len)
        self.vocab_size = int(runner.vocab_size)
        self.max_top_k = int(max_top_k)
        self._held: list[list[int]] = [[] for _ in range(runner.max_rows)]  # the tokens row r holds
        self._used: list[int] = [0] * runner.max_rows  # tick of last use (LRU)
        self._tick = 0
        self._lock = threading.Lock()
        self.stats = PrefixCacheStats()

    def score(self, prompts: Sequence[Sequence[int]], last_n: Sequence[int], k: int) -> list[ScoredPositions]:
        if len(prompts) != len(last_n):
            raise ValueError(f"last_n: {len(last_n)} counts for {len(prompts)} prompts")
        out: list[ScoredPositions] = []
        with self._lock:
            rows = self.runner.max_rows
            for start in range(0, len(prompts), rows):
                out += self._score_chunk([list(map(int, p)) for p in prompts[start:start + rows]],
                                         [int(n) for n in last_n[start:start + rows]], k)
            self.stats.calls += 1
        return out

    def _assign(self, prompts: list[list[int]], last_n: list[int]) -> list[tuple[int, int]]:
        """(row, reused tokens) per prompt: the free row with the most reusable tokens, ties to the least
        recently used."""
        free = set(range(self.runner.max_rows))
        picks = []
        for p, n in zip(prompts, last_n):
            limit = len(p) - n  # positions asked for are computed, never read from the cache
            best = max(free, key=lambda r: (min(common_prefix(self._held[r], p), limit), -self._used[r]))
            free.discard(best)
            picks.append((best, min(common_prefix(self._held[best], p), limit)))
        return picks

    def _score_chunk(self, prompts: list[list[int]], last_n: list[int], k: int) -> list[ScoredPositions]:
        for p, n in zip(prompts, last_n):
            if not 1 <= n <= len(p):
                raise ValueError(f"last_n: {n} outside [1, {len(p)}]")
            if len(p) > self.max_len:
                raise ValueError(f"prompts: {len(p)} tokens exceed max_len {self.max_len}")
        picks = self._assign(prompts, last_n)
        rows = [r for r, _ in picks]
        try:
            self.runner.truncate(rows, [reuse for _, reuse in picks])
            logits = self.runner.forward_span(rows, [p[reuse:] for p, (_, reuse) in zip(prompts, picks)],
                                              num_logits=last_n)  # [sum(last_n), V]
        except Exception:
            self.runner.free(rows)  # a row in an unknown state holds nothing reusable
            for r in rows:
                self._held[r] = []
            raise
        out, offset = [], 0
        for p, n, (r, reuse) in zip(prompts, last_n, picks):
            self._tick += 1
            self._held[r], self._used[r] = p, self._tick
            out.append(scored_from_logits(logits[offset:offset + n], p[len(p) - n + 1:], k, cached_tokens=reuse))
            offset += n
            self.stats.sequences += 1
            self.stats.queries += len(p)
            self.stats.hits += reuse
            self.stats.positions_scored += n
        return out

    def close(self) -> None:
        pass


__all__ = ["RunnerScorer", "PrefixCacheStats", "common_prefix"]
