"""Continuous batching state: the per-request ``Sequence``, admission from a waiting queue, and the
allocation of KV-cache rows.

A sequence uses the same row index in the draft and the target runner. Rows are handed out when a
request is admitted and returned when it finishes or is aborted, so a finished or cancelled request
never holds cache rows past the round in which it ended.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cascade.config import SamplingParams
from cascade.metrics import EmittedToken, RequestStats
from cascade.policies import Policy
from cascade.policies.state import RoundPlan
from cascade.sampling import RequestRng


@dataclass
class Sequence:
    """One request in flight. ``tokens`` = prompt + emitted tokens. The draft cache holds
    ``tokens[:draft_len]`` and the target cache ``tokens[:target_len]``; both lag the last token, which is
    fed at the start of the next round (the target additionally lags by the catch-up tokens).
    ``emitted`` holds one record per emitted token (``EmittedToken``), aligned with ``output_ids``."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    policy: Policy
    rng: RequestRng  # the request's random streams, one generator per device (``cascade.sampling``)
    row: int = -1
    tokens: list[int] = field(default_factory=list)
    emitted: list[EmittedToken] = field(default_factory=list)  # one record per emitted token
    policy_state: Any = None  # what the policy carries between rounds (``Policy.State``, set at admission by
    #   ``Policy.init_state``; only the policy's own hooks change it: ``cascade.policies.state``)
    draft_len: int = 0
    target_len: int = 0
    text: str = ""  # detokenized output, cut at a stop string
    detok_prefix: int = 0  # output ids [detok_prefix, detok_read) are the context of the next detokenisation
    detok_read: int = 0  #   (``cascade.detokenize.extend_text``); ids from detok_read on have no text yet
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stats: RequestStats = field(default_factory=RequestStats)
    arrival_time: float = field(default_factory=time.perf_counter)
    emitted_reported: int = 0  # emitted tokens already returned by Engine.step
    escalation_lengths: list[int] = field(default_factory=list)  # tokens each escalation emitted, not yet reported
    end_ids: frozenset[int] = frozenset()  # the ids that end it: EOS (unless ignore_eos) + stop_token_ids

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)
        self.stats.prompt_tokens = len(self.prompt_ids)
        if self.policy_state is None:
            self.policy_state = self.policy.init_state()

    @property
    def plan(self) -> RoundPlan:
        """What its policy declares for its next round (``Policy.plan`` of its state)."""
        return self.policy.plan(self.policy_state)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]

    @property
    def num_emitted(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def num_ready(self) -> int:
        """Emitted tokens that may be reported: none while its policy holds the output back (an undecided
        request-level answer), else all."""
        return 0 if self.plan.holds_output else self.num_emitted

    def count_positions(self, start: int, n: int, *, draft: bool) -> None:
        """Count n positions a model processed from ``start`` as prefill (inside the prompt) or as work in the
        generated region, in the draft's or the target's counters."""
        prompt_part = max(0, min(n, len(self.prompt_ids) - start))
        if draft:
            self.stats.draft_prefill_tokens += prompt_part
            self.stats.draft_tokens += n - prompt_part
        else:
            self.stats.target_prefill_tokens += prompt_part
            self.stats.target_tokens += n - prompt_part

    @property
    def token_logprobs(self) -> list[float]:
        """Each emitted token's natural log-prob under the model that decided it."""
        return [t.logprob for t in self.emitted]

    def cut_output(self, keep: int) -> None:
        """Drop emitted tokens from output index ``keep`` on (they no longer count as emitted)."""
        self.stats.emitted_tokens -= self.num_emitted - keep
        del self.tokens[len(self.prompt_ids) + keep:], self.emitted[keep:]


@dataclass
class SequenceSnapshot:
    """What a round may change in a sequence, saved before it so that a failed round can be undone."""

    tokens: list[int]
    emitted: list[EmittedToken]
    scalars: dict
    stats: RequestStats
    rng_state: dict[torch.device, torch.Tensor]

    _SCALARS = ("policy", "policy_state", "draft_len", "target_len", "text",
                "detok_prefix", "detok_read", "finished", "finish_reason", "emitted_reported", "escalation_lengths")

    @classmethod
    def of(cls, s: Sequence) -> "SequenceSnapshot":
        return cls(list(s.tokens), list(s.emitted),
                   {name: _copied(getattr(s, name)) for name in cls._SCALARS}, dataclasses.replace(s.stats),
                   s.rng.get_state())

    def restore(self, s: Sequence, draft, target) -> None:
        """Put ``s`` back as it was; cut cache rows the failed round wrote (``draft`` / ``target``: ModelRunners)."""
        s.tokens, s.emitted = list(self.tokens), list(self.emitted)
        for name, value in self.scalars.items():
            setattr(s, name, _copied(value))
        s.stats = dataclasses.replace(self.stats)
        s.rng.set_state(self.rng_state)
        if s.row >= 0:  # the caches may hold positions written by the failed round: cut them (a length update)
            for runner, length in ((draft, s.draft_len), (target, s.target_len)):
                if runner.lengths([s.row])[0] > length:
                    runner.truncate([s.row], [length])


def _copied(value):
    return list(value) if isinstance(value, list) else value


class Scheduler:
    """Waiting queue + running set + free rows. Not thread-safe: the engine loop owns it."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.free_rows: list[int] = list(range(max_rows - 1, -1, -1))  # pop() gives row 0 first
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.running or any(s.request_id == seq.request_id for s in self.waiting):
            raise ValueError(f"request_id {seq.request_id!r} is already in flight")
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free rows (first come, first served)."""
        admitted = []
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            seq.row = self.free_rows.pop()
            self.running[seq.request_id] = seq
            admitted.append(seq)
        return admitted

    def release(self, seq: Sequence) -> None:
        if self.running.pop(seq.request_id, None) is not None:
            self.free_rows.append(seq.row)
            seq.row = -1

    def find(self, request_id: str) -> Sequence | None:
        if request_id in self.running:
            return self.running[request_id]
        return next((s for s in self.waiting if s.request_id == request_id), None)

    def remove_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)

    @property
    def num_free_rows(self) -> int:
        return len(self.free_rows)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
