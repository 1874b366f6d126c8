"""CUDA-graph capture of a static-shape decode step, one graph per batch-size bucket.

A bucket is the smallest of ``1, 2, 4, 8, ...`` (capped at ``max_rows``) that holds the batch; the slots
past the batch are padded with the runner's scratch row and token 0, so each graph sees static shapes.
The step function reads everything it needs from device tensors (rows, ids, the runner's device lengths)
and never syncs with the host, so replay is a copy into the static inputs plus ``graph.replay()``.
Graphs are captured lazily, on first use of a bucket; capture runs the step on scratch-row-only inputs
so that warm-up and capture leave every real row untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def buckets_for(max_rows: int) -> list[int]:
    """``[1, 2, 4, ..., max_rows]``: powers of two below ``max_rows``, then ``max_rows`` itself."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    out.append(max_rows)
    return out


class GraphedDecode:
    """Callable ``(rows [B] int64 host, ids [B] int64 device) -> logits [B, V] float32``."""

    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        max_rows: int,
        scratch_row: int,
        device: torch.device,
        warmup: int = 2,
    ):
        self.step = step  # (rows [Bb] device int64, ids [Bb] device int64) -> [Bb, V]
        self.buckets = buckets_for(max_rows)
        self.scratch_row = scratch_row
        self.device = device
        self.warmup = warmup
        self.rows_buf = torch.full((max_rows,), scratch_row, dtype=torch.long, device=device)
        self.ids_buf = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds max_rows {self.buckets[-1]}")

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        rows, ids = self.rows_buf[:b], self.ids_buf[:b]
        rows.fill_(self.scratch_row)
        ids.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(rows, ids)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(rows, ids)
        torch.cuda.synchronize(self.device)
        return graph, out

    def capture_all(self) -> None:
        """Capture every bucket now (otherwise each is captured on first use)."""
        for b in self.buckets:
            if b not in self.graphs:
                self.graphs[b] = self._capture(b)

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        b = self.bucket(n)
        if b not in self.graphs:
            self.graphs[b] = self._capture(b)
        graph, out = self.graphs[b]
        self.rows_buf[:n].copy_(rows, non_blocking=True)
        self.rows_buf[n:b].fill_(self.scratch_row)
        self.ids_buf[:n].copy_(ids, non_blocking=True)
        self.ids_buf[n:b].zero_()
        graph.replay()
        return out[:n].clone()
