"""Verify stats of escalated positions: everything a deferral rule and speculative acceptance need, from
the draft's and the target's logits at the same positions, in one fused call.

``verify_stats`` dispatches to the Triton kernel for CUDA tensors and to the torch reference for anything
else; ``backend=`` forces one ("triton" on CPU tensors needs ``TRITON_INTERPRET=1``). Definitions, the
sampling noise and why the residual does not depend on the deferral rule ``delta`` are in the docstring
of ``cascade.kernels.verify``. The policy then does the cheap ``[R]`` vector work outside the kernel:
``delta`` from the rule statistics, ``pi(x) = (1 - delta) q(x) + delta p(x)`` and the acceptance
probability ``min(1, pi(x) / q(x))``; at the first rejection it emits ``residual_token``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cascade.confidence import _DTYPES, inverse_temperature, resolve_backend


@dataclass(frozen=True)
class VerifyStats:
    """Per verified position (row) statistics of the draft ``q`` and target ``p`` distributions."""

    q_token: torch.Tensor  # [R] float32, q(x): draft sampling-distribution prob of the draft token x
    p_token: torch.Tensor  # [R] float32, p(x): target sampling-distribution prob of x
    max_q: torch.Tensor  # [R] float32, max prob of q (rule statistic)
    max_p: torch.Tensor  # [R] float32, max prob of p (rule statistic)
    tv: torch.Tensor  # [R] float32, total variation sum_v max(0, p(v) - q(v)) between the SAMPLING
    #   distributions (the authors' notebook's convention): 1[x != argmax p] on greedy rows
    logp_token: torch.Tensor  # [R] float32, log p(x): target log-softmax at x at the rule temperature
    #   (T = 1 on greedy rows: the natural log-prob, not log of the one-hot p_token; -inf at a -inf logit)
    residual_token: torch.Tensor  # [R] int64, a sample from norm(max(0, p - q))
    target_token: torch.Tensor  # [R] int64, a sample from p
    token: torch.Tensor  # [R] int64, the draft token x itself


def verify_stats(
    draft_logits: torch.Tensor,  # [R, V] fp32 | bf16 | fp16, may hold -inf
    target_logits: torch.Tensor,  # [R, V] fp32 | bf16 | fp16, may hold -inf
    draft_tokens: torch.Tensor,  # [R] int64, the draft's token x at each position, in [0, V)
    temperature: torch.Tensor | float,  # [R] fp32 (or one float), 0 = greedy row
    noise_seed: torch.Tensor,  # [R] int64 >= 0, per-position key of the sampling noise
    *,
    backend: str = "auto",
) -> VerifyStats:
    """Fused verify statistics; rule statistics (max q, max p, log p(x)) use softmax(logits / T) (T = 1 on
    greedy rows), the sampling quantities and TV use the sampling distributions (one-hot at the argmax on
    greedy rows)."""
    for name, t in (("draft_logits", draft_logits), ("target_logits", target_logits)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be [R, V], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be one of {_DTYPES}, got {t.dtype}")
    if draft_logits.shape != target_logits.shape:
        raise ValueError(f"draft_logits {tuple(draft_logits.shape)} and target_logits "
                         f"{tuple(target_logits.shape)} must have the same shape")
    if draft_logits.device != target_logits.device:
        raise ValueError("draft_logits and target_logits must be on the same device")
    R, V = draft_logits.shape
    if V < 1:
        raise ValueError("logits must have a non-empty vocabulary")
    for name, t in (("draft_tokens", draft_tokens), ("noise_seed", noise_seed)):
        if tuple(t.shape) != (R,):
            raise ValueError(f"{name} must be [{R}], got shape {tuple(t.shape)}")
    device = draft_logits.device
    temp = torch.as_tensor(temperature, dtype=torch.float32, device=device)
    if temp.dim() == 0:
        temp = temp.expand(R)
    inv_t = inverse_temperature(temp, R, device)
    if resolve_backend(backend, draft_logits) == "triton":
        from cascade.kernels.verify import verify_triton as run
    else:
        from cascade.kernels.verify import verify_reference as run
    out = run(draft_logits, target_logits, draft_tokens, temp, inv_t, noise_seed)
    # The kernel's tv is between the rule distributions (T = 1 on greedy rows). OPT reads TV between the
    # sampling distributions (google-research's notebook): on a greedy row those are one-hots at argmax q
    # (= x) and argmax p, so TV = 1 - p(x) there; sampled rows already agree.
    out["tv"] = torch.where(temp > 0, out["tv"], 1.0 - out["p_token"].float())
    return VerifyStats(**out, token=draft_tokens)
