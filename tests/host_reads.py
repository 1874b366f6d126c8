"""Count the host reads of device results, on CPU: a stand-in for what a GPU round pays in syncs.

``DeviceTensor`` marks a tensor as living on the accelerator. Every torch op on one returns one again (so
anything computed from a model's logits stays "on the device"), and every way of bringing its values to
the host (``.tolist()``, ``.item()``, ``.cpu()``, ``.numpy()``, ``int()`` / ``float()`` / ``bool()``, Python
iteration) is counted as one host read and returns a plain (host) tensor or Python value. ``.to(device)`` is
not counted: here every device is the CPU, so a move to the runner's device (free of syncs on a GPU)
cannot be told from a move to the host; the engine's host reads are ``.cpu()`` / ``.tolist()`` / ``fetch``. ``count_host_reads(runner)`` wraps a runner so its logits come back as DeviceTensors.
Host reads of tensors that never touched a model's output (e.g. ids built on the host) are not counted,
as they would not be syncs on a GPU either."""

from __future__ import annotations

import torch

_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__iter__}


class DeviceTensor(torch.Tensor):
    reads = 0  # host reads outside the engine's one read point (``cascade.host.fetch``)
    where: list[str] = []
    paused = False  # inside fetch: its reads are the counted syncs, not strays

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            import traceback

            frames = [f for f in traceback.extract_stack() if "/cascade/" in f.filename]
            in_reference = bool(frames) and "/cascade/kernels/" in frames[-1].filename  # CPU references: GPUs run kernels
            if not cls.paused and not in_reference:
                cls.reads += 1
                frame = frames[-1] if frames else traceback.extract_stack()[-2]
                cls.where.append(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {func.__name__}")
            with torch._C.DisableTorchFunctionSubclass():
                plain = [a.as_subclass(torch.Tensor) if isinstance(a, DeviceTensor) else a for a in args]
                return func(*plain, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


class CountingRunner:
    """A runner whose logits are DeviceTensors (everything else passes through). Its inputs are handed to the
    real runner as plain tensors: the CPU runner validates token ids on the host, a CUDA one does not."""

    def __init__(self, runner):
        self._r = runner

    def __getattr__(self, name):
        return getattr(self._r, name)

    def forward_span(self, *a, **kw):
        return self._r.forward_span(*a, **kw).as_subclass(DeviceTensor)

    def decode(self, rows, ids):
        with torch._C.DisableTorchFunctionSubclass():
            ids = ids.as_subclass(torch.Tensor) if isinstance(ids, torch.Tensor) else ids
        return self._r.decode(rows, ids).as_subclass(DeviceTensor)

    def decode_loop(self, rows, ids, steps, vocab=None):
        with torch._C.DisableTorchFunctionSubclass():
            ids = ids.as_subclass(torch.Tensor) if isinstance(ids, torch.Tensor) else ids
        return tuple(t.as_subclass(DeviceTensor) for t in self._r.decode_loop(rows, ids, steps, vocab))


def counted_fetch(real_fetch, calls: list[int]):
    """Wrap ``cascade.host.fetch``: count its calls, and do not count its own reads as strays."""

    def fetch(*tensors):
        calls.append(len(tensors))
        DeviceTensor.paused = True
        try:
            out = real_fetch(*tensors)
            with torch._C.DisableTorchFunctionSubclass():
                return [t.as_subclass(torch.Tensor) for t in out]  # on the host now
        finally:
            DeviceTensor.paused = False

    return fetch


def reset() -> None:
    DeviceTensor.reads = 0
    DeviceTensor.where = []
