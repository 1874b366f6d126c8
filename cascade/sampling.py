"""Per-request token sampling: logit bias, min_tokens, top-k / top-p / min-p filtering, temperature, greedy, and each request's random
streams (``RequestRng``: one seeded generator per device the request draws on, so a draw always uses a
generator on the device of the tensor it draws from).

The same filtering shapes both the draft's proposal ``q`` and the target's ``p`` (speculative
acceptance is exact only when both are the distributions the request asked for). Filtering marks
removed tokens with ``-inf`` and leaves the temperature to the consumer, so the confidence and verify
kernels see exactly the logits the sampler drew from.
"""

from __future__ import annotations

import math
import secrets
from typing import Iterable, Sequence

import torch

from cascade.config import SamplingParams


def needs_filter(params: SamplingParams, emitted: float = math.inf, end_ids: Iterable[int] = ()) -> bool:
    """Does a row decoded with ``params``, ``emitted`` tokens into its output, need processing at all?"""
    return bool(params.logit_bias) or (params.min_tokens > emitted and bool(params.end_ids(end_ids))) or \
        (not params.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0))


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams], emitted: Sequence[int] | None = None,
                  end_ids: Iterable[int] = ()) -> torch.Tensor:
    """Apply each row's logit processing. logits: [B, V] (any float dtype); params: [B]; emitted: [B], how many
    tokens of its output precede each row's position (for ``min_tokens``; None: no row is inside its
    ``min_tokens``); end_ids: the model's EOS ids. Returns [B, V] float32: ``logit_bias`` added, and -inf on the
    ids that end the request while inside ``min_tokens`` and outside the top-k, the top-p nucleus and the
    ``min_p`` floor. Rows that need nothing are returned unchanged (as float32).

    In vLLM's order: bias, the min_tokens mask, then temperature-scaled top-k, top-p and min-p. This one
    function shapes the draft's proposal and the target's distribution alike (both call it with the same
    params and positions), so lossless acceptance stays exact under every field."""
    out = logits.float()
    end_ids = tuple(end_ids)
    before = list(emitted) if emitted is not None else [math.inf] * len(params)
    rows = [i for i, p in enumerate(params) if needs_filter(p, before[i], end_ids)]
    if not rows:
        return out
    out = out.clone()
    for i in rows:
        out[i] = _filter_row(out[i], params[i], before[i], end_ids)
    return out


def _filter_row(row: torch.Tensor, p: SamplingParams, emitted: float, end_ids: tuple[int, ...]) -> torch.Tensor:
    """row: [V] float32 logits -> [V]: biased, with -inf where processing removes a token."""
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.int64, device=row.device)
        row = row.index_add(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=row.device))
    if p.min_tokens > emitted:
        ends = [t for t in sorted(p.end_ids(end_ids)) if t < row.numel()]
        if ends:
            row = row.index_fill(0, torch.tensor(ends, dtype=torch.int64, device=row.device), float("-inf"))
    if p.greedy:
        return row
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
    if p.min_p > 0.0:  # p_i >= min_p * p_max  <=>  scaled_i >= max(scaled) + log(min_p)
        scaled = scaled.masked_fill(scaled < scaled.max() + math.log(p.min_p), float("-inf"))
    return torch.where(torch.isinf(scaled), scaled, row)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], rngs: Sequence["RequestRng"]) -> torch.Tensor:
    """Draw one token per row. logits: [B, V] filtered float32 logits -> [B] int64 (on logits' device).

    Greedy rows take the argmax (first index on ties); the others draw from softmax(logits / T) with
    their request's generator on logits' device, so a request's draws do not depend on which other
    requests share the batch."""
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        out[i] = torch.multinomial(probs, 1, generator=rngs[i].on(probs.device))[0]
    return out


def top_logprobs(logits: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The k most likely tokens of each row and their natural (T = 1) log-probs, as the chosen token's
    log-prob is computed. logits: [N, V] filtered logits -> [values [N, k] float32, ids [N, k] int64]."""
    values, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), k, dim=-1)
    return [values, ids]


def top_lists(values: torch.Tensor, ids: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Host [N, K] values / ids -> per row the first k (token id, log-prob) pairs."""
    return [list(zip(i[:k], v[:k])) for i, v in zip(ids.tolist(), values.tolist())]


class RequestRng:
    """A request's random streams: one ``torch.Generator`` per device it draws on, made on first use.

    PyTorch draws on a CUDA tensor only with a CUDA generator (and on a CPU tensor only with a CPU one),
    and the draft and the target may live on different devices, so each draw asks ``on(tensor.device)``.
    Every stream is seeded from the request's seed (fresh entropy when it has none): the CPU stream with
    the seed itself, every other device with the seed mixed with the device's name, so two devices never
    share a stream (draft sampling and acceptance uniforms drawn from one sequence of numbers on two
    GPUs would be correlated). Seeded output therefore depends on the request and the devices only, not on
    the batch. ``get_state`` / ``set_state`` snapshot and restore every stream (a failed round is undone)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = int(seed) if seed is not None else secrets.randbits(63)
        self._gens: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device | str) -> torch.Generator:
        """This request's generator on ``device`` (a tensor's ``.device``; "cuda" means the current one)."""
        dev = _canonical(torch.device(device))
        gen = self._gens.get(dev)
        if gen is None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(self.seed if dev.type == "cpu" else _mix(self.seed, str(dev)))
            self._gens[dev] = gen
        return gen

    @property
    def devices(self) -> list[torch.device]:
        """The devices this request has drawn on so far."""
        return list(self._gens)

    def get_state(self) -> dict[torch.device, torch.Tensor]:
        return {dev: g.get_state() for dev, g in self._gens.items()}

    def set_state(self, state: dict[torch.device, torch.Tensor]) -> None:
        """Restore ``get_state``'s snapshot; a stream first used after it is dropped (it restarts fresh)."""
        for dev in list(self._gens):
            if dev in state:
                self._gens[dev].set_state(state[dev])
            else:
                del self._gens[dev]


def _canonical(dev: torch.device) -> torch.device:
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def _mix(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, device name): splitmix64 over the seed xor a stable hash of the name."""
    h = 0
    for ch in name.encode():
        h = (h * 1099511628211 + ch) & 0xFFFFFFFFFFFFFFFF
    x = (seed ^ h) & 0xFFFFFFFFFFFFFFFF
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def uniforms(n: int, generator: torch.Generator) -> torch.Tensor:
    """n uniform draws in [0, 1) for acceptance tests: [n] float32 on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device)


def noise_seeds(n: int, generator: torch.Generator) -> torch.Tensor:
    """n non-negative int64 keys for the verify kernel's counter-based Gumbel noise: [n] int64."""
    return torch.randint(0, 2**62, (n,), generator=generator, device=generator.device, dtype=torch.int64)
