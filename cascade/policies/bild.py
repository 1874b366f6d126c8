"""Big Little Decoder: Kim, Mangalam, Moon, Malik, Mahoney, Gholami, Keutzer, "Speculative Decoding with
Big Little Decoder", NeurIPS 2023 (arXiv 2302.07863)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from cascade.policies.base import (
    BlockConfidence,
    Policy,
    check_number,
    check_unit,
    register,
)

if TYPE_CHECKING:
    from cascade.verification import VerifyStats


@register("bild")
@dataclass(frozen=True)
class BiLD(Policy):
    """BiLD's two policies inside the engine's rounds, following the authors' ``T5BiLDModel``
    (kssteven418/BigLittleDecoder). Not lossless.

    fallback (the paper's fallback policy): the draft decodes until the max probability (T = 1) of its
    next-token distribution falls below ``fallback``. That token is not kept: drafting stops right after
    it (``stop_drafting``), the trigger cuts the block before it and escalates, and the target decides that
    position (the bonus position of the escalation, a draw from p: its argmax when greedy).
    hand-over: after ``k`` draft tokens without a fallback (the authors' ``num_small_iters``, default 10)
    control passes to the target all the same: the block is escalated, checked, and the target adds one
    token. So no draft token is released unchecked, except in a last block that ends the request (EOS, a
    stop string, max_tokens) before k tokens: the authors' loop ends there too, without the large model.
    rollback (the paper's rollback policy): the target scores every kept draft token x of the block in one
    pass; the first x whose cross-entropy -log p(x) (T = 1 on greedy rows, the request temperature
    otherwise) exceeds ``rollback`` is replaced by the target's own token there (a draw from p: the
    argmax when greedy) and the rest of the block is dropped, unless that token equals x: then nothing
    is rolled back there (as in the authors' code). Departure: the authors stop checking at such a
    position; here the later positions of the block are still checked (the target scored them in the
    same pass, so checking costs nothing). Also, after a rollback the authors let the large model run one
    more step; here the draft resumes at once.
    fallback = 0 never falls back (the target still checks every k tokens); rollback = inf never rolls
    back (the target then only adds a token after each block)."""

    replace_from_target: ClassVar[bool] = True
    stops_drafting: ClassVar[bool] = True
    fallback: float = 0.6  # the fallback threshold on the draft's max probability (authors' default 0.6)
    rollback: float = 5.0  # the rollback threshold on the target's cross-entropy of a draft token, nats (authors': 5)
    k: int = 10  # num_small_iters: draft tokens before the target checks, fallback or not

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit("fallback", self.fallback)
        check_number("rollback", self.rollback, low=0.0)

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        low = (conf.max_prob < self.fallback) & conf.valid
        fell_back = low.any(dim=1)
        keep = torch.where(fell_back, low.float().argmax(dim=1).to(torch.int64), conf.drafted)
        return keep, fell_back | (conf.drafted >= self.k)

    def stop_drafting(self, max_prob: torch.Tensor) -> torch.Tensor:
        return max_prob < self.fallback

    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        return torch.ones_like(v.q_token)

    def acceptance(self, v: "VerifyStats", delta: torch.Tensor) -> torch.Tensor:
        """Keep x where -log p(x) <= rollback, or where the target's replacement would be x itself."""
        return ((-v.logp_token <= self.rollback) | (v.target_token == v.token)).float()
