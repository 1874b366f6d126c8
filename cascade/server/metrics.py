"""Prometheus collectors of the server, on a registry of its own (one per app, so two servers in one
process, as in the tests, never share or double-register collectors).

Metric names (prefixed ``cascade_``; every series labelled ``model_name``, the served name):
- ``requests_total{status}``: finished engine requests (one per choice) by ``ok`` / ``error`` / ``aborted``,
  plus HTTP refusals by status code (``400``, ``404``, ``429``, ...).
- ``tokens_total{source}``: emitted tokens by who decided them: ``draft`` (emitted without the target),
  ``verified`` (draft tokens the target accepted), ``target`` (replacements and target-only steps),
  ``bonus``.
- ``prompt_tokens_total``: prompt tokens of the requests the engine took (per choice).
- ``escalations_total``; ``acceptance_length`` (histogram): tokens each escalation emitted (accepted draft
  tokens + the replacement or bonus), one observation per escalation.
- vLLM's speculative-decoding counters, under vLLM's own names: ``vllm:spec_decode_num_drafts_total``
  (verified blocks), ``vllm:spec_decode_num_draft_tokens_total`` (draft tokens verified) and
  ``vllm:spec_decode_num_accepted_tokens_total`` (accepted), so acceptance-rate panels built for vLLM work.
- ``target_errors_total``: target passes that failed (a vLLM target down or timing out), per request.
- ``target_token_fraction`` (histogram, per finished request); ``request_seconds``, ``time_to_first_token_seconds``.
- ``round_seconds`` (histogram): one engine round.
- ``block_length_rounds_total{k}``: rounds dynamic speculation ran lossless requests at block length k
  (``k="0"``: not speculating, the target decoding them alone); absent when it is off (``--fixed-k``).
- ``queue_depth``, ``active_rows``, ``kv_rows_free`` (gauges).

The cascade's own stats dataclasses live in ``cascade.metrics``; this module only exports them.
"""

from __future__ import annotations

import time
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 -- re-exported for the /metrics route

from cascade.metrics import EmittedToken, RequestStats, TokenSource

_SOURCE_LABEL = {TokenSource.DRAFT: "draft", TokenSource.VERIFIED: "verified", TokenSource.TARGET: "target",
                 TokenSource.BONUS: "bonus"}


class ServerMetrics:
    """The server's collectors; the engine thread and the routes update them. Every series carries the
    served model's name as ``model_name`` (as vLLM's do), so one Prometheus can scrape several servers."""

    def __init__(self, model_name: str = "cascade") -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self._requests = Counter("cascade_requests", "Finished requests by status", m + ["status"], registry=r)
        self._tokens = Counter("cascade_tokens", "Emitted tokens by the model that decided them", m + ["source"], registry=r)
        self.prompt_tokens = Counter("cascade_prompt_tokens", "Prompt tokens of accepted requests (per choice)",
                                     m, registry=r).labels(model_name)
        self.escalations = Counter("cascade_escalations", "Target passes that verified a drafted block", m,
                                   registry=r).labels(model_name)
        self.target_errors = Counter("cascade_target_errors", "Target passes that failed (target unreachable), "
                                     "per request they affected", m, registry=r).labels(model_name)
        self.acceptance_length = Histogram("cascade_acceptance_length", "Tokens emitted per escalation", m,
                                           buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 17), registry=r).labels(model_name)
        # the speculative-decoding counters under vLLM's names, so dashboards built for vLLM read them
        self.spec_drafts = Counter("vllm:spec_decode_num_drafts", "Drafted blocks the target verified", m,
                                   registry=r).labels(model_name)
        self.spec_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens the target verified", m,
                                         registry=r).labels(model_name)
        self.spec_accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens the target accepted",
                                            m, registry=r).labels(model_name)
        self.target_token_fraction = Histogram(
            "cascade_target_token_fraction", "Target-processed positions / emitted tokens, per finished request", m,
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0), registry=r).labels(model_name)
        self.request_seconds = Histogram("cascade_request_seconds", "Time from submission to the last token", m,
                                         buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r).labels(model_name)
        self.ttft_seconds = Histogram("cascade_time_to_first_token_seconds", "Time from submission to the first token", m,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r).labels(model_name)
        self.round_seconds = Histogram("cascade_round_seconds", "One engine round over the running batch", m,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r).labels(model_name)
        self._block_lengths = Counter("cascade_block_length_rounds", "Rounds dynamic speculation ran lossless "
                                      "requests at block length k (0: no speculation)", m + ["k"], registry=r)
        self._block_lengths_seen: dict[int, int] = {}
        self.queue_depth = Gauge("cascade_queue_depth", "Requests waiting for a cache row", m, registry=r).labels(model_name)
        self.active_rows = Gauge("cascade_active_rows", "Cache rows held by running requests", m, registry=r).labels(model_name)
        self.kv_rows_free = Gauge("cascade_kv_rows_free", "Cache rows free", m, registry=r).labels(model_name)
        for source in _SOURCE_LABEL.values():  # export zeros from the start
            self._tokens.labels(model_name, source)

    def count_tokens(self, tokens: Sequence[EmittedToken]) -> None:
        """Emitted tokens by who decided them."""
        counts: dict[str, int] = {}
        for token in tokens:
            label = _SOURCE_LABEL[token.source]
            counts[label] = counts.get(label, 0) + 1
        for label, n in counts.items():
            self._tokens.labels(self.model_name, label).inc(n)

    def escalated(self, lengths: Sequence[int], verified: int, accepted: int) -> None:
        """New escalations: the tokens each one emitted (one observation per escalation), and the draft
        tokens they verified and accepted."""
        self.escalations.inc(len(lengths))
        self.spec_drafts.inc(len(lengths))
        for n in lengths:
            self.acceptance_length.observe(n)
        self.spec_draft_tokens.inc(verified)
        self.spec_accepted_tokens.inc(accepted)

    def finished(self, status: str, handle, stats: RequestStats | None) -> None:
        """A request ended (``ok`` / ``error`` / ``aborted``)."""
        self._requests.labels(self.model_name, status).inc()
        if stats is not None and status == "ok":
            self.target_token_fraction.observe(stats.target_token_fraction)
            self.request_seconds.observe(time.perf_counter() - handle.submitted_at)
            if handle.first_token_at is not None:
                self.ttft_seconds.observe(handle.first_token_at - handle.submitted_at)

    def block_lengths(self, rounds_by_k: dict[int, int]) -> None:
        """The engine's running count of rounds per chosen block length (``EngineStats.block_length_rounds``):
        the counters advance by what is new since the last call."""
        for k, n in rounds_by_k.items():
            new = n - self._block_lengths_seen.get(k, 0)
            if new > 0:
                self._block_lengths.labels(self.model_name, str(k)).inc(new)
                self._block_lengths_seen[k] = n

    def refused(self, http_status: int) -> None:
        self._requests.labels(self.model_name, str(http_status)).inc()

    def set_occupancy(self, *, queue_depth: int, active_rows: int, rows_free: int) -> None:
        self.queue_depth.set(queue_depth)
        self.active_rows.set(active_rows)
        self.kv_rows_free.set(rows_free)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
