"""Triton kernels of the cascade runtime, one kernel per file, each with its host launcher and its torch
reference beside it:

- ``confidence.py``: one-pass online-softmax confidence stats of the draft's logits (argmax, max-prob,
  top-1/top-2 margin, entropy, logsumexp, log-prob of the drafted token), exact over the full vocabulary;
- ``attention.py``: attention of a few new positions per row over that row's KV cache in place, stopping at
  the row's own length (the CUDA-graph steps of ``cascade.models.llama``);
- ``verify.py``: the fused verify stats of escalated positions (q(x), p(x), max q, max p, total
  variation, a draw from the residual ``norm(max(0, p - q))`` and a draw from ``p``).

Nothing here is imported by ``import cascade``; ``cascade.confidence`` and ``cascade.verification``
import these modules on first use and pick the kernel (CUDA tensors) or the torch reference (anything
else). Each module imports triton behind a guard, so the torch references work without triton.

This package is deliberately ``cascade.kernels`` and not a top-level ``kernels``: a top-level package of
that name would be picked up by transformers' hub-kernels probe.
"""
