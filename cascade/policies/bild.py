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
    """BiLD's two policies inside the engine's rounds. Not lossless.

    fallback (the paper's fallback policy): the draft decodes until the max probability of its next-token
    distribution falls below ``fallback``. That token is not kept: drafting stops right after it
    (``stop_drafting``), the trigger cuts the block before it and escalates, and the target decides that
    position (it is the bonus position of the escalation). A round without such a token (``k`` tokens
    drafted) is not escalated; ``k`` only bounds a round, the draft simply continues next round.

    rollback (the paper's rollback policy): when the target runs, it scores in the same pass every draft
    token since its previous run: the tokens of earlier non-escalated rounds (held back as *pending*, see
    ``checks_pending``: they are not streamed until checked) and the kept block. The first token x whose
    target cross-entropy -log p(x) exceeds ``rollback`` is replaced by a draw from p (the target's own
    prediction there) and every later token is discarded. p is at the request temperature (T = 1 on
    greedy rows, the natural cross-entropy). Tokens that pass are labelled VERIFIED.
    A request that ends (EOS, stop string, max_tokens) with pending tokens releases them unchecked: no
    target pass runs after the end.
    fallback = 0 never escalates (draft-only output); rollback = inf never rolls back."""

    replace_from_target: ClassVar[bool] = True
    checks_pending: ClassVar[bool] = True
    stops_drafting: ClassVar[bool] = True
    fallback: float = 0.5  # the fallback threshold on the draft's max probability
    rollback: float = 3.0  # the rollback threshold on the target's cross-entropy of a draft token, nats
    k: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit("fallback", self.fallback)
        check_number("rollback", self.rollback, low=0.0)

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        low = (conf.max_prob < self.fallback) & conf.valid
        escalate = low.any(dim=1)
        first_low = torch.where(escalate, low.float().argmax(dim=1), conf.drafted)
        return first_low.to(torch.int64), escalate

    def stop_drafting(self, max_prob: torch.Tensor) -> torch.Tensor:
        return max_prob < self.fallback

    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        return torch.ones_like(v.q_token)

    def acceptance(self, v: "VerifyStats", delta: torch.Tensor) -> torch.Tensor:
        return self.check_pending(v.logp_token).float()

    def check_pending(self, logp_token: torch.Tensor) -> torch.Tensor:
        return -logp_token <= self.rollback
