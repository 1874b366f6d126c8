"""Cascade policies: a trigger (draft-only test: escalate this block or not) and a deferral rule
(at each verified position, how much of the acceptance distribution comes from the target).

A policy is a small frozen dataclass registered under a name; nothing branches on strings. The engine
calls three methods, each on whole tensors for all sequences that share the policy:

- ``trigger(conf) -> (block_len [B], escalate [B])`` from the draft's confidence over the block;
- ``deferral(v) -> delta [R]`` from the fused verify statistics of escalated positions;
- ``acceptance(v, delta) -> accept_prob [R]``: keep the draft token x with this probability. The base
  rule is speculative sampling against ``pi = (1 - delta) q + delta p``: ``min(1, pi(x) / q(x))``. At the
  first rejection the engine emits ``v.residual_token`` (a draw from ``norm(max(0, pi - q))``), or
  ``v.target_token`` (a draw from ``p``) for policies with ``replace_from_target``; after a fully accepted
  escalated block it emits a bonus token drawn from ``p``.

Add a policy by writing one class here with ``@register("name")``; ``make_policy`` / ``parse_policy``
turn a name and parameters (from the library, CLI or HTTP) into an instance, with ValueErrors that name
the bad field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from cascade.verification import VerifyStats

DEFAULT_K = 5  # draft block length; DESIGN measured ~4.3 tokens per target pass at k=4 on the default pair


@dataclass(frozen=True)
class BlockConfidence:
    """The draft's confidence over each sequence's drafted block (padded to the longest block).

    All tensors are [B, K]; positions at or past ``drafted[b]`` are padding (``valid`` is False there)."""

    max_prob: torch.Tensor  # [B, K] float32
    margin: torch.Tensor  # [B, K] float32, top-1 minus top-2 probability
    entropy: torch.Tensor  # [B, K] float32, nats
    token_logprob: torch.Tensor  # [B, K] float32, log q of the drafted token
    valid: torch.Tensor  # [B, K] bool
    drafted: torch.Tensor  # [B] int64, tokens drafted per sequence


@dataclass(frozen=True)
class Policy:
    """Base policy: the trigger and deferral rule of plain speculative decoding (always escalate, delta = 1)."""

    name: ClassVar[str] = "base"
    uses_draft: ClassVar[bool] = True  # False: the target decodes every token itself
    replace_from_target: ClassVar[bool] = False  # at a rejection, draw from p instead of the residual
    k: int = DEFAULT_K  # draft block length

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or not 1 <= self.k <= 64:
            raise ValueError(f"k must be an integer in [1, 64], got {self.k!r}")

    # -- trigger ---------------------------------------------------------------------------------
    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (block_len [B] int64, escalate [B] bool). Default: keep the whole block, always escalate."""
        return conf.drafted.clone(), torch.ones_like(conf.drafted, dtype=torch.bool)

    # -- deferral and acceptance ------------------------------------------------------------------
    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        """-> delta [R] float32 in [0, 1]."""
        return torch.ones_like(v.q_token)

    def acceptance(self, v: "VerifyStats", delta: torch.Tensor) -> torch.Tensor:
        """-> accept_prob [R] = min(1, pi(x) / q(x)) with pi = (1 - delta) q + delta p."""
        ratio = v.p_token / v.q_token.clamp_min(1e-30)
        return ((1.0 - delta) + delta * ratio).clamp(0.0, 1.0)

    # -- naming ------------------------------------------------------------------------------------
    def describe(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return f"{self.name}({args})"


_REGISTRY: dict[str, type[Policy]] = {}


def register(name: str):
    def wrap(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def _check_unit(field_name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{field_name} must be in [0, 1], got {value!r}")


@register("speculative")
@dataclass(frozen=True)
class Speculative(Policy):
    """Lossless speculative decoding (Leviathan et al. 2023): every block is verified with delta = 1,
    so the output distribution is exactly the target's; greedy output equals target-only greedy."""


@register("draft-only")
@dataclass(frozen=True)
class DraftOnly(Policy):
    """Baseline: the draft answers alone; the target never runs."""

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        return conf.drafted.clone(), torch.zeros_like(conf.drafted, dtype=torch.bool)


@register("target-only")
@dataclass(frozen=True)
class TargetOnly(Policy):
    """Baseline: the target decodes every token; the draft never runs."""

    uses_draft: ClassVar[bool] = False


@register("chow")
@dataclass(frozen=True)
class Chow(Policy):
    """Chow's rule (Speculative Cascades, Narasimhan et al. 2024).

    trigger: escalate the block if any drafted position has max q < 1 - alpha.
    deferral: delta = 1[max q < 1 - alpha] per verified position, so confident draft tokens are kept as
    they are (pi = q) and unconfident ones are checked against the target (pi = p).
    alpha = 0 escalates everything that is not certain (close to lossless); alpha = 1 never escalates."""

    alpha: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit("alpha", self.alpha)

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        low = (conf.max_prob < 1.0 - self.alpha) & conf.valid
        return conf.drafted.clone(), low.any(dim=1)

    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        return (v.max_q < 1.0 - self.alpha).float()


@register("bild")
@dataclass(frozen=True)
class BiLD(Policy):
    """Big Little Decoder (Kim et al. 2023).

    fallback: drafting stops at the first position whose max q < ``fallback``; that token is not kept and
    the target decides it (it is the bonus position of the escalation). Blocks with no such position are
    emitted without the target.
    rollback: at a verified position the draft token x is rejected when the target's cross-entropy
    -log p(x) exceeds ``rollback`` (p at the request's temperature, 1 for greedy); the replacement is drawn
    from p, not from a residual. BiLD is not lossless."""

    replace_from_target: ClassVar[bool] = True
    fallback: float = 0.5
    rollback: float = 3.0
    k: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit("fallback", self.fallback)
        if not isinstance(self.rollback, (int, float)) or self.rollback < 0:
            raise ValueError(f"rollback must be >= 0, got {self.rollback!r}")

    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        low = (conf.max_prob < self.fallback) & conf.valid
        escalate = low.any(dim=1)
        first_low = torch.where(escalate, low.float().argmax(dim=1), conf.drafted)
        return first_low.to(torch.int64), escalate

    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        return torch.ones_like(v.q_token)

    def acceptance(self, v: "VerifyStats", delta: torch.Tensor) -> torch.Tensor:
        return (-v.logp_token <= self.rollback).float()


def make_policy(name: str, **params) -> Policy:
    """Instantiate a registered policy. Unknown names and parameters raise ValueError naming them."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"policy: unknown policy {name!r}; known policies: {', '.join(policy_names())}")
    allowed = {f.name for f in fields(cls)}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(allowed)}")
    return cls(**params)


def parse_value(text: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"policy parameter value {text!r} is not a number") from None


def parse_policy(spec: "str | Policy") -> Policy:
    """Parse ``name``, ``name(a=1, b=2)`` or ``name:v1:v2`` (values in field order after ``k``) into a policy."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    m = re.fullmatch(r"([\w-]+)\s*\((.*)\)", spec)
    if m:
        name, body = m.group(1), m.group(2)
        params = {}
        for part in filter(None, (p.strip() for p in body.split(","))):
            if "=" not in part:
                raise ValueError(f"policy parameter {part!r} must be written name=value")
            key, value = part.split("=", 1)
            params[key.strip()] = parse_value(value)
        return make_policy(name, **params)
    name, *values = spec.split(":")
    cls = _REGISTRY.get(name)
    if cls is None:
        return make_policy(name)  # raises the unknown-policy error
    order = [f.name for f in fields(cls) if f.name != "k"] + ["k"]
    if len(values) > len(order):
        raise ValueError(f"policy {name!r} takes at most {len(order)} positional values ({order}), got {values}")
    return make_policy(name, **{key: parse_value(v) for key, v in zip(order, values)})
