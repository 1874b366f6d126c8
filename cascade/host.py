"""Where a round's device results come back to the host: ``fetch``, one device sync per call.

A GPU round is fast only if the host waits for the device a few times per round, not once per sequence or
per drafted token. Every read of model-derived tensors on the engine's hot path goes through ``fetch``:
it starts a non-blocking copy of each tensor into pinned host memory, then synchronises the stream once,
so one call costs one sync however many tensors it brings back (on the CPU it is a plain ``.cpu()``).
The engine counts its calls (``EngineStats.host_syncs``); ``tests/test_host_syncs.py`` checks that a
round makes at most three, at any batch size, and that nothing else on the hot path reads the device.
"""

from __future__ import annotations

import torch


def fetch(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host copies of ``tensors`` (each any shape / dtype / device), after one synchronisation."""
    out = [t.to("cpu", non_blocking=True) for t in tensors]
    devices = {t.device for t in tensors if t.device.type == "cuda"}
    for dev in devices:
        torch.cuda.current_stream(dev).synchronize()
    return out
