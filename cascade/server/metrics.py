"""Prometheus collectors of the server, on a registry of its own (one per app, so two servers in one
process, as in the tests, never share or double-register collectors).

Metric names (all prefixed ``cascade_``):
- ``requests_total{status}``: finished engine requests (one per choice) by ``ok`` / ``error`` / ``aborted``,
  plus HTTP refusals by status code (``400``, ``404``, ``429``, ...).
- ``tokens_total{source}``: emitted tokens by who decided them: ``draft`` (emitted without the target),
  ``verified`` (draft tokens the target accepted), ``target`` (replacements and target-only steps),
  ``bonus``.
- ``escalations_total``; ``acceptance_length`` (histogram): tokens emitted per escalation.
- ``target_errors_total``: target passes that failed (a vLLM target down or timing out), per request.
- ``target_token_fraction`` (histogram, per finished request); ``request_seconds``, ``time_to_first_token_seconds``.
- ``round_seconds`` (histogram): one engine round.
- ``queue_depth``, ``active_rows``, ``kv_rows_free`` (gauges).

The cascade's own stats dataclasses live in ``cascade.metrics``; this module only exports them.
"""

from __future__ import annotations

import time
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 -- re-exported for the /metrics route

from cascade.metrics import RequestStats, TokenSource

_SOURCE_LABEL = {TokenSource.DRAFT: "draft", TokenSource.VERIFIED: "verified", TokenSource.TARGET: "target",
                 TokenSource.BONUS: "bonus"}


class ServerMetrics:
    """The server's collectors; the engine thread and the routes update them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cascade_requests", "Finished requests by status", ["status"], registry=r)
        self.tokens = Counter("cascade_tokens", "Emitted tokens by the model that decided them", ["source"], registry=r)
        self.escalations = Counter("cascade_escalations", "Target passes that verified a drafted block", registry=r)
        self.target_errors = Counter("cascade_target_errors", "Target passes that failed (target unreachable), "
                                     "per request they affected", registry=r)
        self.acceptance_length = Histogram("cascade_acceptance_length", "Tokens emitted per escalation",
                                           buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 17), registry=r)
        self.target_token_fraction = Histogram(
            "cascade_target_token_fraction", "Target-processed positions / emitted tokens, per finished request",
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0), registry=r)
        self.request_seconds = Histogram("cascade_request_seconds", "Time from submission to the last token",
                                         buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.ttft_seconds = Histogram("cascade_time_to_first_token_seconds", "Time from submission to the first token",
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.round_seconds = Histogram("cascade_round_seconds", "One engine round over the running batch",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.queue_depth = Gauge("cascade_queue_depth", "Requests waiting for a cache row", registry=r)
        self.active_rows = Gauge("cascade_active_rows", "Cache rows held by running requests", registry=r)
        self.kv_rows_free = Gauge("cascade_kv_rows_free", "Cache rows free", registry=r)
        for source in _SOURCE_LABEL.values():  # export zeros from the start
            self.tokens.labels(source)

    def count_tokens(self, sources: Sequence[TokenSource]) -> None:
        counts: dict[str, int] = {}
        for src in sources:
            label = _SOURCE_LABEL[src]
            counts[label] = counts.get(label, 0) + 1
        for label, n in counts.items():
            self.tokens.labels(label).inc(n)

    def escalated(self, n: int, mean_length: float) -> None:
        self.escalations.inc(n)
        for _ in range(n):
            self.acceptance_length.observe(mean_length)

    def finished(self, status: str, handle, stats: RequestStats | None) -> None:
        """A request ended (``ok`` / ``error`` / ``aborted``)."""
        self.requests.labels(status).inc()
        if stats is not None and status == "ok":
            self.target_token_fraction.observe(stats.target_token_fraction)
            self.request_seconds.observe(time.perf_counter() - handle.submitted_at)
            if handle.first_token_at is not None:
                self.ttft_seconds.observe(handle.first_token_at - handle.submitted_at)

    def refused(self, http_status: int) -> None:
        self.requests.labels(str(http_status)).inc()

    def set_occupancy(self, *, queue_depth: int, active_rows: int, rows_free: int) -> None:
        self.queue_depth.set(queue_depth)
        self.active_rows.set(active_rows)
        self.kv_rows_free.set(rows_free)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
