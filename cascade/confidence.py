"""Confidence stats of the draft distribution: per drafted position, exact over the full vocabulary.

``confidence_stats`` reduces draft logits ``[R, V]`` to six ``[R]`` vectors in one pass over the
vocabulary (see ``cascade.kernels.confidence`` for the algorithm). It dispatches to the Triton kernel for
CUDA tensors and to the torch reference for anything else; ``backend=`` forces one ("triton" on CPU
tensors needs ``TRITON_INTERPRET=1``, which is how the tests run the kernel). Neither triton nor the
kernel module is imported until the first call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ConfidenceStats:
    """Per-row confidence of softmax(logits / T) (T <= 0, a greedy row, is treated as 1)."""

    argmax: torch.Tensor  # [R] int64, first index of the max logit
    max_prob: torch.Tensor  # [R] float32, max softmax probability
    margin: torch.Tensor  # [R] float32, p(top1) - p(top2)
    entropy: torch.Tensor  # [R] float32, nats
    logsumexp: torch.Tensor  # [R] float32, of logits / temperature
    token_logprob: torch.Tensor  # [R] float32, log softmax at tokens[r] (0.0 where tokens is None)


def inverse_temperature(temperature: float | torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """[R] fp32 ``1 / T``, with 1 where ``T <= 0`` (greedy rows get the T = 1 distribution's stats)."""
    t = torch.as_tensor(temperature, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(rows)
    if t.shape != (rows,):
        raise ValueError(f"temperature must be a float or a [{rows}] tensor, got shape {tuple(t.shape)}")
    one = torch.ones((), dtype=torch.float32, device=device)
    return torch.where(t > 0, one / torch.where(t > 0, t, one), one).contiguous()


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """'torch' or 'triton' for this input: auto = triton on CUDA tensors when triton is importable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not tensor.is_cuda:
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    if backend == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return backend


def confidence_stats(
    logits: torch.Tensor,  # [R, V] fp32 | bf16 | fp16, may hold -inf (tokens removed by top-k / top-p)
    temperature: float | torch.Tensor = 1.0,  # float or [R] fp32; <= 0 (greedy row) is treated as 1
    tokens: torch.Tensor | None = None,  # None or [R] int64 in [0, V)
    *,
    backend: str = "auto",
) -> ConfidenceStats:
    """Exact confidence stats over the full vocabulary, fp32 math whatever the input dtype."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits dtype must be one of {_DTYPES}, got {logits.dtype}")
    R, V = logits.shape
    if V < 1:
        raise ValueError("logits must have a non-empty vocabulary")
    if tokens is not None and tuple(tokens.shape) != (R,):
        raise ValueError(f"tokens must be [{R}], got shape {tuple(tokens.shape)}")
    inv_t = inverse_temperature(temperature, R, logits.device)
    if resolve_backend(backend, logits) == "triton":
        from cascade.kernels.confidence import confidence_triton as run
    else:
        from cascade.kernels.confidence import confidence_reference as run
    return ConfidenceStats(**run(logits, inv_t, tokens))
