"""The model-runner contract the engine is written against.

A runner owns one model and its KV cache. It works on token ids and *rows*: row ``r`` is a cache slot
that holds one sequence's keys and values for positions ``0 .. length[r]-1``. The engine (through the
scheduler) decides which row a sequence uses; the runner never allocates rows itself.

Rollback is a length update: ``truncate`` lowers ``length[r]``; positions at or past the length are
masked out of attention and overwritten by the next write, so nothing is copied.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


class TargetUnavailable(RuntimeError):
    """A remote target could not be reached (down, timing out, out of retries). The engine fails the
    requests of that target pass or degrades them to draft-only, as ``EngineConfig.on_target_error`` says."""


@runtime_checkable
class ModelRunner(Protocol):
    vocab_size: int  # logits width V
    max_rows: int  # cache rows
    max_len: int  # positions per row
    num_params: int  # parameter count, for FLOP accounting (2 * params * positions)
    device: torch.device

    def lengths(self, rows: Sequence[int]) -> list[int]:
        """Current cached length of each row."""
        ...

    def forward_span(
        self, rows: Sequence[int], spans: Sequence[Sequence[int]], num_logits: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Append ``spans[i]`` (token ids) to row ``rows[i]`` in one ragged pass and return logits.

        Returns float32 logits ``[sum(n_i), V]``, rows in order, where ``n_i = num_logits[i]`` (default:
        ``len(spans[i])``) are the *last* ``n_i`` positions of span ``i``. Prefill is
        ``forward_span(rows, prompts, num_logits=[1]*B)``. Raises ValueError if a row would exceed max_len
        or a span is empty."""
        ...

    def decode(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token per row: ``rows [B] int64``, ``ids [B] int64`` -> float32 logits ``[B, V]``.
        Same result as ``forward_span(rows, [[i] for i in ids])``; the fast path (CUDA graphs)."""
        ...

    def decode_loop(self, rows: torch.Tensor | Sequence[int], ids: torch.Tensor, steps: int,
                    vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy drafting in one call: ``steps`` one-token steps per row, step 0 fed ``ids [B]``, step j > 0 the
        argmax (over ids < ``vocab``, default all) of step j - 1's logits -> (logits [steps, B, V] float32,
        tokens [steps, B] int64), exactly ``steps`` ``decode`` calls with the argmax fed back. A runner without
        a faster way (one CUDA graph) implements it with ``decode_steps``."""
        ...

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Roll rows back to the given lengths (each <= current length)."""
        ...

    def free(self, rows: Sequence[int]) -> None:
        """Release rows: their length becomes 0."""
        ...


def decode_steps(runner: ModelRunner, rows: torch.Tensor | Sequence[int], ids: torch.Tensor, steps: int,
                 vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ModelRunner.decode_loop`` as ``steps`` ``decode`` calls, each fed the argmax (over ids < ``vocab``) of
    the previous step's logits; the loop of a runner that has no fused one."""
    vocab = runner.vocab_size if vocab is None else int(vocab)
    logits, tokens, cur = [], [], ids
    for _ in range(steps):
        out = runner.decode(rows, cur)
        cur = out[:, :vocab].argmax(dim=-1)
        logits.append(out)
        tokens.append(cur)
    return torch.stack(logits), torch.stack(tokens)
