"""Static-shape model steps, one per (batch bucket, token bucket), captured as CUDA graphs.

A step feeds ``n`` new tokens to each of ``B`` rows: the draft's one-token decode is ``n = 1``, the target's
verify pass (catch-up + block + bonus position) a few. A batch bucket is the smallest of ``1, 2, 4, ...``
(capped at ``max_rows``) that holds the batch, a token bucket the smallest configured ``n`` that holds the
longest span; slots past the batch are padded with the runner's scratch row, token slots past a row's span
with token 0 and a per-row count of valid slots, so each graph sees static shapes. The step reads
everything it needs from device tensors (rows, ids, valid counts, the runner's device lengths) and never
syncs with the host, so replay is a copy into the static inputs plus ``graph.replay()``.

The draft's greedy block (``greedy_loop``: ``steps`` one-token steps, each fed the previous one's argmax)
is one more graph per (batch bucket, steps), so a k-token block is one replay instead of k - 1.

Graphs are captured at start-up for every configured bucket (``capture_all``; a bucket first met later is
captured then). Capture runs the step on scratch-row-only inputs, so warm-up and capture leave every real
row untouched. With ``capture=False`` the same padded static step runs eagerly, on any device: the CPU tests
run the CUDA path's padding, selection and attention this way, all but the capture itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def buckets_for(max_rows: int) -> list[int]:
    """``[1, 2, 4, ..., max_rows]``: powers of two below ``max_rows``, then ``max_rows`` itself."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    out.append(max_rows)
    return out


def smallest_fit(buckets: Sequence[int], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GraphedSteps:
    """Callable ``(rows [B] int64 host, ids [B, n] int64 device, n_valid [B] int64 device) -> logits
    [B, n, V] float32`` (a fresh tensor; slots past a row's ``n_valid`` hold garbage)."""

    def __init__(self, step: Step, max_rows: int, token_buckets: Sequence[int], scratch_row: int,
                 device: torch.device, *, capture: bool = True, warmup: int = 2, width: int | None = None):
        """width: the logits' width V (needed by ``greedy_loop``)."""
        self.step = step  # (rows [Bb], ids [Bb, nb], n_valid [Bb]) device int64 -> [Bb, nb, V]
        # greedy_loop's argmax mask [V]: 0 on the ids it may pick, -inf past its vocab (set before each
        # replay, so one graph serves any vocab)
        self.loop_mask = torch.zeros(width or 1, dtype=torch.float32, device=device)
        self._mask_vocab = width
        self.batch_buckets = buckets_for(max_rows)
        self.token_buckets = sorted(set(int(n) for n in token_buckets))
        if not self.token_buckets or self.token_buckets[0] < 1:
            raise ValueError(f"token_buckets must be positive, got {list(token_buckets)}")
        self.scratch_row = scratch_row
        self.device = device
        self.capture = capture
        self.warmup = warmup
        nmax = self.token_buckets[-1]
        self.rows_buf = torch.full((max_rows,), scratch_row, dtype=torch.long, device=device)
        self.ids_buf = torch.zeros(max_rows, nmax, dtype=torch.long, device=device)
        self.valid_buf = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}  # (b, n) steps, ("loop", b, steps)
        self.pool = None

    @property
    def max_tokens(self) -> int:
        return self.token_buckets[-1]

    def bucket(self, batch: int, tokens: int) -> tuple[int, int]:
        return smallest_fit(self.batch_buckets, batch, "batch"), smallest_fit(self.token_buckets, tokens, "tokens")

    def _inputs(self, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rows_buf[:b], self.ids_buf[:b, :n], self.valid_buf[:b]

    def _capture(self, b: int, n: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        rows, ids, valid = self._inputs(b, n)
        return self._capture_call(b, n, lambda: self.step(rows, ids, valid))

    def _capture_call(self, b: int, n: int, fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
        """Capture ``fn`` on scratch-row-only inputs of bucket (b, n). It overwrites the static inputs, so a
        caller fills them with its batch only after this returns (a graph first met mid-serving too)."""
        rows, ids, valid = self._inputs(b, n)
        rows.fill_(self.scratch_row)
        ids.zero_()
        valid.fill_(n)
        return self._record(fn)

    def _record(self, fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
        """Warm ``fn`` up on a side stream (Triton compiles there, not during capture), then capture it."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        torch.cuda.synchronize(self.device)
        return graph, out

    def capture_all(self, loop_steps: Sequence[int] = ()) -> None:
        """Capture every (batch bucket, token bucket) now, and the greedy loops of ``loop_steps`` steps for
        every batch bucket; a no-op when ``capture`` is off."""
        if not self.capture:
            return
        with torch.inference_mode():  # as the runner's calls that replay them
            for n in self.token_buckets:
                for b in self.batch_buckets:
                    if (b, n) not in self.graphs:
                        self.graphs[(b, n)] = self._capture(b, n)
            for steps in loop_steps:
                for b in self.batch_buckets:
                    self._loop_graph(b, int(steps))

    def _loop_body(self, b: int, steps: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """Greedy drafting of ``steps`` one-token steps on the static inputs of batch bucket b: step j is fed
        the argmax (under ``loop_mask``) of step j - 1, starting from ``ids_buf[:b, 0]``."""
        rows, ids, valid = self._inputs(b, 1)

        def body() -> tuple[torch.Tensor, torch.Tensor]:
            cur, logits, tokens = ids, [], []
            for _ in range(steps):
                out = self.step(rows, cur, valid)[:, 0]  # [b, V]
                tok = (out + self.loop_mask).argmax(dim=-1)  # [b]: the first maximum, as a slice's argmax
                logits.append(out)
                tokens.append(tok)
                cur = tok.view(-1, 1)
            return torch.stack(logits), torch.stack(tokens)  # [steps, b, V], [steps, b]

        return body

    def _loop_graph(self, b: int, steps: int):
        key = ("loop", b, steps)
        if key not in self.graphs:
            self.graphs[key] = self._capture_call(b, 1, self._loop_body(b, steps))
        return self.graphs[key]

    def greedy_loop(self, rows: torch.Tensor, ids: torch.Tensor, steps: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows [B]`` int64 host, ``ids [B]`` int64 device (the first step's input), ``steps`` >= 1 ->
        (logits [steps, B, V] float32, tokens [steps, B] int64): step j's logits, and its argmax over ids <
        vocab, which step j + 1 is fed. Captured, the whole loop is one graph replay: no host work between
        steps (the draft's k-step block at greedy decoding)."""
        B = ids.shape[0]
        b, _ = self.bucket(B, 1)
        if vocab != self._mask_vocab:
            if not 1 <= vocab <= self.loop_mask.numel():
                raise ValueError(f"vocab must be in [1, {self.loop_mask.numel()}], got {vocab}")
            self.loop_mask.zero_()
            self.loop_mask[vocab:] = float("-inf")
            self._mask_vocab = vocab
        ones = torch.ones(B, dtype=torch.long, device=self.device)
        if not self.capture:
            self._fill(rows, ids.view(-1, 1), ones, b, 1)
            logits, tokens = self._loop_body(b, steps)()
            return logits[:, :B], tokens[:, :B]
        graph, (logits, tokens) = self._loop_graph(b, steps)  # first: a capture resets the static inputs
        self._fill(rows, ids.view(-1, 1), ones, b, 1)
        graph.replay()
        return logits[:, :B].clone(), tokens[:, :B].clone()

    def _fill(self, rows: torch.Tensor, ids: torch.Tensor, n_valid: torch.Tensor, b: int, n: int) -> None:
        """Copy a batch into the static inputs of bucket (b, n), padding slots past it."""
        B, n_in = ids.shape
        self.rows_buf[:B].copy_(rows, non_blocking=True)
        self.rows_buf[B:b].fill_(self.scratch_row)
        self.ids_buf[:B, :n_in].copy_(ids, non_blocking=True)
        self.ids_buf[:b, n_in:n].zero_()
        self.ids_buf[B:b].zero_()
        self.valid_buf[:B].copy_(n_valid, non_blocking=True)
        self.valid_buf[B:b].fill_(1)  # padded slots write position 0 of the scratch row

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        B, n_in = ids.shape
        b, n = self.bucket(B, n_in)
        if not self.capture:
            self._fill(rows, ids, n_valid, b, n)
            return self.step(*self._inputs(b, n))[:B, :n_in]
        if (b, n) not in self.graphs:  # before the fill: a capture resets the static inputs
            self.graphs[(b, n)] = self._capture(b, n)
        graph, out = self.graphs[(b, n)]
        self._fill(rows, ids, n_valid, b, n)
        graph.replay()
        return out[:B, :n_in].clone()
