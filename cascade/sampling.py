"""Per-request token sampling: top-k / top-p filtering, temperature, greedy, seeded generators.

The same filtering shapes both the draft's proposal ``q`` and the target's ``p`` (speculative
acceptance is exact only when both are the distributions the request asked for). Filtering marks
removed tokens with ``-inf`` and leaves the temperature to the consumer, so the confidence and verify
kernels see exactly the logits the sampler drew from.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cascade.config import SamplingParams


def needs_filter(params: SamplingParams) -> bool:
    return not params.greedy and (params.top_k > 0 or params.top_p < 1.0)


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Apply each row's top-k / top-p. logits: [B, V] (any float dtype); returns [B, V] float32 with
    filtered-out entries at -inf. Rows that need no filtering are returned unchanged (as float32)."""
    out = logits.float()
    rows = [i for i, p in enumerate(params) if needs_filter(p)]
    if not rows:
        return out
    out = out.clone()
    for i in rows:
        out[i] = _filter_row(out[i], params[i])
    return out


def _filter_row(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """row: [V] float32 logits -> [V] with -inf outside the top-k and the top-p nucleus."""
    scaled = row / p.temperature
    if p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # mass strictly before each token; keep a token while that mass is < top_p (always keeps the top one)
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.where(torch.isinf(scaled), scaled, row)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Draw one token per row. logits: [B, V] filtered float32 logits -> [B] int64.

    Greedy rows take the argmax (first index on ties); the others draw from softmax(logits / T) with
    their own generator, so a request's draws do not depend on which other requests share the batch."""
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator: seeded when the request gives a seed, from fresh entropy otherwise."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def uniforms(n: int, generator: torch.Generator) -> torch.Tensor:
    """n uniform draws in [0, 1) for acceptance tests: [n] float32 on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device)


def noise_seeds(n: int, generator: torch.Generator) -> torch.Tensor:
    """n non-negative int64 keys for the verify kernel's counter-based Gumbel noise: [n] int64."""
    return torch.randint(0, 2**62, (n,), generator=generator, device=generator.device, dtype=torch.int64)
