"""Per-request policy state: what a policy carries from one round of a request to the next, declared by the
policy, kept by the engine (``Sequence.policy_state``) and by the replay, updated only by the policy.

A policy's state is a frozen dataclass of scalar fields (``float``, ``int`` or ``bool``): ``Policy.State``,
one instance per request (``Policy.init_state``). Where a policy works on a batch (its trigger, its
``after_round``) the states of its requests are *stacked*: the same dataclass with one ``[B]`` tensor per
field (``stack``), so a rule is written once over tensors whatever the batch; ``unstack`` turns a batch back
into per-request states, ``take`` / ``put`` select and write rows of a batch (the replay keeps every path's
state as one batch).

What the engine must know of a request before a round is not read from class flags but asked of the
policy, from the request's state: ``Policy.plan(state) -> RoundPlan``. ``handoff``'s window
(``cascade.policies.handoff``) and ``quantile``'s routing decision (``cascade.policies.routing``) are such
states; a policy with none has ``NoState``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

_DTYPES = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}


@dataclass(frozen=True)
class NoState:
    """The state of a policy that carries nothing between rounds."""


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did for a batch of requests (host tensors), as ``Policy.after_round`` reads it."""

    escalated: torch.Tensor  # [B] bool: the round's block went to the target
    emitted: torch.Tensor  # [B] int64: tokens the round emitted
    logprobs: torch.Tensor  # [B, W] float32: each emitted token's natural log-prob under the model that decided
    #   it (``EmittedToken.logprob``: a DRAFT token's log q(x), a verified or target token's log p), 0 past emitted[b]

    def take(self, index: torch.Tensor) -> "RoundOutcome":
        """Rows ``index`` [A] of the batch."""
        return RoundOutcome(self.escalated[index], self.emitted[index], self.logprobs[index])

    def emitted_mask(self) -> torch.Tensor:
        """-> [B, W] bool: the columns of ``logprobs`` that hold an emitted token."""
        return torch.arange(self.logprobs.shape[1]).view(1, -1) < self.emitted.view(-1, 1)


@dataclass(frozen=True)
class RoundPlan:
    """What the engine must know of one request before its round, as its policy declares it from its state."""

    drafts: bool = True  # the draft proposes a block (False: the target decodes the next token alone)
    holds_output: bool = False  # tokens emitted are not reported until the policy has decided (until then, and
    #   at an abort, the request's deltas are empty)


def has_fields(state_type: type) -> bool:
    """Does a policy's state carry anything (else the engine skips stacking and updating it)?"""
    return bool(fields(state_type))


def _dtype(state_type: type, name: str, annotation: Any) -> torch.dtype:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if kind not in _DTYPES:
        raise TypeError(f"{state_type.__name__}.{name}: a policy state field must be float, int or bool, got {kind!r}")
    return _DTYPES[kind]


def stack(states: Sequence[Any], device: torch.device | str | None = None) -> Any:
    """Per-request states of one type -> the batch: the same dataclass, one [B] tensor per field."""
    cls = type(states[0])
    return cls(**{f.name: torch.tensor([getattr(s, f.name) for s in states], dtype=_dtype(cls, f.name, f.type))
                  .to(device if device is not None else "cpu", non_blocking=True) for f in fields(cls)})


def unstack(batch: Any) -> list[Any]:
    """A batch of states (host tensors) -> per-request states with Python scalars."""
    cls = type(batch)
    columns = {f.name: getattr(batch, f.name).tolist() for f in fields(cls)}
    n = len(next(iter(columns.values()))) if columns else 0
    return [cls(**{name: values[i] for name, values in columns.items()}) for i in range(n)]


def initial_batch(policy, n: int) -> Any:
    """The initial states of ``n`` >= 1 requests under ``policy``, stacked."""
    return stack([policy.init_state()] * n)


def take(batch: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` [A] of a batch of states."""
    cls = type(batch)
    return cls(**{f.name: getattr(batch, f.name)[index] for f in fields(cls)})


def put(batch: Any, index: torch.Tensor, rows: Any) -> None:
    """Write ``rows`` (a batch of A states) into rows ``index`` [A] of ``batch``, in place."""
    for f in fields(type(batch)):
        column = getattr(batch, f.name)
        column[index] = getattr(rows, f.name).to(column.dtype)
