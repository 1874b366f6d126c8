"""The benchmark scripts' view of ``cascade.machine`` (they import it as a sibling module), plus a probe of
the memory bandwidth the host gives this machine right now.

Why the probe: on a shared 2-core cloud VM the bandwidth available to one process changes from one minute
to the next with what other tenants of the host do (measured here on a 2-core EPYC: a fixed bf16 matrix
product ran at 18.6 to 24.5 GB/s in consecutive 5-second windows, with no CPU steal reported), and decoding
is bandwidth-bound, so two identical runs minutes apart differ by as much. A benchmark that compares
policies run at different times records the probe beside each run, so that a reader can see the host's
state behind every figure rather than mistake it for a property of the code."""

from __future__ import annotations

import time

import torch

from cascade.machine import cpu_model, machine_info  # noqa: F401


def memory_bandwidth_gb_s(seconds: float = 2.0, mib: int = 256) -> float:
    """GB/s of weight reads in a bf16 [16, n] x [n, m] product over a ``mib`` MiB matrix, repeated for
    ``seconds`` (after one untimed product), the access pattern of a batched decode step."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    cols = 4096
    rows = mib * 2**20 // (2 * cols)
    w = torch.ones(rows, cols, dtype=torch.bfloat16)
    x = torch.ones(16, cols, dtype=torch.bfloat16)
    x @ w.T
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x @ w.T
        n += 1
    return n * w.numel() * w.element_size() / (time.perf_counter() - t0) / 1e9
