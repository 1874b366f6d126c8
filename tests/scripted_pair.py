"""A hand-built model pair for exact engine tests: each runner's logits are a function of the token
history only (``fn(history) -> {token: prob}``), so a test can say precisely what the draft proposes,
how confident it is and what the target would decide at every position, and check the engine's output
and cost counters token for token. It implements the ``ModelRunner`` contract (rows, lengths,
``forward_span``, ``decode``, ``truncate``, ``free``) with plain Python lists instead of a KV cache."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from cascade import Cascade
from cascade.config import EngineConfig
from cascade.models.base import decode_steps

Table = Callable[[tuple[int, ...]], Mapping[int, float]]  # history -> {token: probability}


class ScriptedRunner:
    """A ModelRunner whose next-token distribution is ``table(history)``; unlisted tokens get a tiny
    probability so every row is a proper distribution over the whole vocabulary."""

    def __init__(self, table: Table, *, vocab_size: int = 16, max_rows: int = 4, max_len: int = 256,
                 num_params: int = 1000) -> None:
        self.table, self.vocab_size, self.max_rows, self.max_len = table, vocab_size, max_rows, max_len
        self.num_params, self.device = num_params, torch.device("cpu")
        self.rows: list[list[int]] = [[] for _ in range(max_rows)]
        self.calls = 0  # forward passes (forward_span and decode calls)

    def logits(self, history: Sequence[int]) -> torch.Tensor:
        probs = dict(self.table(tuple(history)))
        rest = max(0.0, 1.0 - sum(probs.values()))
        tiny = max(rest, 1e-6) / self.vocab_size
        row = torch.full((self.vocab_size,), math.log(tiny), dtype=torch.float64)
        for tok, p in probs.items():
            row[tok] = math.log(max(p, 1e-12))
        return torch.log_softmax(row, dim=0).float()

    def lengths(self, rows):
        return [len(self.rows[r]) for r in rows]

    def forward_span(self, rows, spans, num_logits=None):
        self.calls += 1
        out = []
        for i, (r, span) in enumerate(zip(rows, spans)):
            if not span:
                raise ValueError("empty span")
            n = len(span) if num_logits is None else num_logits[i]
            start = len(self.rows[r])
            self.rows[r].extend(int(t) for t in span)
            if len(self.rows[r]) > self.max_len:
                raise ValueError("row would exceed max_len")
            for end in range(len(self.rows[r]) - n + 1, len(self.rows[r]) + 1):
                assert end > start - 1
                out.append(self.logits(self.rows[r][:end]))
        return torch.stack(out)

    def decode(self, rows, ids):
        return self.forward_span([int(r) for r in rows], [[int(t)] for t in ids])

    def decode_loop(self, rows, ids, steps, vocab=None):
        return decode_steps(self, rows, ids, steps, vocab)

    def truncate(self, rows, lengths):
        for r, n in zip(rows, lengths):
            assert n <= len(self.rows[r])
            del self.rows[r][n:]

    def free(self, rows):
        for r in rows:
            self.rows[r] = []


def scripted_cascade(draft: Table, target: Table, *, vocab_size: int = 16, eos=(), detokenize=None,
                     max_rows: int = 4) -> Cascade:
    d = ScriptedRunner(draft, vocab_size=vocab_size, max_rows=max_rows)
    t = ScriptedRunner(target, vocab_size=vocab_size, max_rows=max_rows, num_params=3000)
    c = Cascade(d, t, None, eos_token_ids=list(eos), config=EngineConfig(max_rows=max_rows, max_len=256))
    if detokenize is not None:
        c.engine.detokenize = detokenize
    return c


def chain(next_token: Mapping[int, int], confidence: Mapping[int, float] | float = 0.99,
          default: int = 0) -> Table:
    """A table that, after last token ``t``, puts ``confidence`` (per t, or one value) on
    ``next_token[t]`` and spreads the rest evenly over three other tokens (so max prob = confidence)."""
    def table(history: tuple[int, ...]) -> dict[int, float]:
        last = history[-1]
        nxt = next_token.get(last, default)
        c = confidence.get(last, 0.99) if isinstance(confidence, Mapping) else confidence
        others = [t for t in (13, 14, 15) if t != nxt]
        return {nxt: c, **{o: (1.0 - c) / len(others) for o in others}}
    return table
