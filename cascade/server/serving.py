"""The engine thread and its bridge to asyncio: continuous batching for the HTTP server.

One background thread owns the models and the ``Engine``: it is the only code that touches them. Between
rounds it takes new requests and cancellations from an inbox, then runs one round over every running
sequence (``Engine.step_isolating``: an exception fails only the request that raised it) and hands each
request's new output to that request's ``asyncio.Queue`` on the server's event loop. Requests join and
leave the running batch between rounds; beyond ``max_rows`` running rows they wait in the engine's
queue, and beyond ``max_queue`` waiting requests ``submit`` refuses them (``QueueFull`` -> HTTP 429).

A cancelled request (client gone) is aborted at the start of the next round, which frees its cache rows.
``stop(drain=True)`` lets running and queued requests finish (up to a timeout), then cancels the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from cascade.config import SamplingParams
from cascade.engine import RequestOutput
from cascade.library import Cascade, Prompt
from cascade.metrics import RequestStats
from cascade.models.base import TargetUnavailable
from cascade.policies import Policy

log = logging.getLogger("cascade.server")


class QueueFull(Exception):
    """More requests in flight than rows + queue allow; answer 429 and retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the server is at capacity: every cache row is busy and the queue is full")
        self.retry_after_s = retry_after_s


class ServerStopping(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class RequestFailed:
    """The final event of a request that failed inside a round (the others went on)."""

    request_id: str
    error: str
    status: int = 500  # HTTP status a non-streamed request answers with
    code: str = "engine_error"  # OpenAI error code

    @classmethod
    def of(cls, request_id: str, exc: Exception) -> "RequestFailed":
        """The failure event for an exception raised in a request's round; an unreachable target is a 503."""
        if isinstance(exc, TargetUnavailable):
            return cls(request_id, f"the target model is unavailable: {exc}", 503, "target_unavailable")
        return cls(request_id, f"the request failed inside the engine: {type(exc).__name__}: {exc}")


@dataclass
class Handle:
    """One engine request as the HTTP side sees it: its events arrive on ``events`` (``RequestOutput``
    per round, the last one with ``finished``; or a final ``RequestFailed``)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    policy: Policy
    events: asyncio.Queue
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


class EngineLoop:
    """Owns a ``Cascade`` on a background thread and serves requests submitted from an asyncio loop."""

    def __init__(self, cascade: Cascade, *, max_queue: int = 64, metrics=None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.cascade, self.engine = cascade, cascade.engine
        self.max_queue = max_queue
        self.metrics = metrics  # cascade.server.metrics.ServerMetrics or None
        self._lock = threading.Condition()
        self._inbox: list[Handle] = []
        self._cancel: set[str] = set()
        self._handles: dict[str, Handle] = {}  # every request in flight (inbox + engine)
        self._last_stats: dict[str, tuple[int, int, int]] = {}  # per request: (verified, accepted, target errors) so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_deadline: float | None = None
        self._ids = itertools.count()
        self.round_seconds_avg = 0.5  # for Retry-After; refreshed as rounds run

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop is already running")
        self._loop = loop
        self._update_gauges()  # right from start-up, not from the first round on (every row free, nothing queued)
        self._thread = threading.Thread(target=self._run, name="cascade-engine", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop taking requests; with ``drain``, let those in flight finish for up to ``timeout_s`` seconds;
        then cancel what is left and join the thread."""
        with self._lock:
            self._stopping = True
            self._drain_deadline = time.monotonic() + (timeout_s if drain else 0.0)
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s + 30.0)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ requests (asyncio side)
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (the tokenizer is thread-safe for encoding)."""
        return self.cascade.encode(prompt)

    def submit(self, prompts: Sequence[tuple[list[int], SamplingParams]], policy: Policy) -> list[Handle]:
        """Queue one engine request per (prompt ids, params), all or none. Raises ValueError naming the
        field for a request the engine cannot run, ``QueueFull`` when rows and queue are taken, and
        ``ServerStopping`` during shutdown."""
        for prompt_ids, params in prompts:
            self.engine.check_request(prompt_ids, params, policy)
        with self._lock:
            if self._stopping:
                raise ServerStopping("the server is shutting down")
            if len(self._handles) + len(prompts) > self.engine.max_rows + self.max_queue:
                raise QueueFull(retry_after_s=max(1, round(self.round_seconds_avg * 4)))
            handles = []
            for prompt_ids, params in prompts:
                rid = f"req-{next(self._ids)}"
                h = Handle(rid, list(prompt_ids), params, policy, asyncio.Queue())
                self._handles[rid] = h
                self._inbox.append(h)
                handles.append(h)
            self._lock.notify_all()
        return handles

    def cancel(self, handles: Sequence[Handle]) -> None:
        """Abort requests (a client went away); their rows are freed before the next round."""
        with self._lock:
            self._cancel.update(h.request_id for h in handles if h.request_id in self._handles)
            self._lock.notify_all()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._handles)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            self._serve_rounds()
        except BaseException:  # a bug in the loop itself: fail what is in flight rather than hang it
            log.exception("the engine loop stopped")
            with self._lock:
                self._stopping = True
                handles = list(self._handles.values()) + self._inbox
                self._inbox = []
            for h in handles:
                self._deliver(h, RequestFailed(h.request_id, "the request failed: the engine loop stopped"), status="error")
            raise

    def _serve_rounds(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._cancel or self.engine.has_work() or self._stopping):
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                cancel, self._cancel = self._cancel, set()
                stopping, deadline = self._stopping, self._drain_deadline
                in_flight = list(self._handles)
            if stopping and deadline is not None and time.monotonic() >= deadline:
                cancel |= {h.request_id for h in inbox} | set(in_flight)
            for h in inbox:
                if h.request_id in cancel:
                    self._deliver(h, RequestFailed(h.request_id, "the request was cancelled"), status="aborted")
                    continue
                try:
                    self.engine.add_request(h.request_id, h.prompt_ids, h.params, h.policy)
                except Exception as exc:  # noqa: BLE001 -- checked at submit; a failure here fails this request only
                    self._deliver(h, RequestFailed.of(h.request_id, exc), status="error")
                    continue
                if self.metrics is not None:
                    self.metrics.prompt_tokens.inc(len(h.prompt_ids))
            for rid in cancel:
                h = self._handles.get(rid)
                if h is not None and self.engine.abort(rid):
                    self._deliver(h, RequestFailed(rid, "the request was cancelled"), status="aborted")
            self._update_gauges()
            if not self.engine.has_work():
                if stopping:
                    break
                continue
            t0 = time.perf_counter()
            try:
                outputs, failed = self.engine.step_isolating()
            except Exception:  # noqa: BLE001 -- the engine itself broke: fail everything in flight, keep serving
                log.exception("engine round failed outside any one request")
                with self._lock:  # (requests submitted during the round are in the inbox, not the engine yet)
                    waiting = {h.request_id for h in self._inbox}
                    in_engine = [(rid, h) for rid, h in self._handles.items() if rid not in waiting]
                for rid, h in in_engine:
                    self.engine.abort(rid)
                    self._deliver(h, RequestFailed(rid, "the request failed: internal error in the engine round"), status="error")
                continue
            elapsed = time.perf_counter() - t0
            self.round_seconds_avg = 0.9 * self.round_seconds_avg + 0.1 * elapsed
            if self.metrics is not None:
                self.metrics.round_seconds.observe(elapsed)
                self.metrics.block_lengths(self.engine.stats.block_length_rounds)
            for out in outputs:
                h = self._handles.get(out.request_id)
                if h is None:
                    continue
                if out.request_id in failed:
                    exc = failed[out.request_id]
                    log.error("request %s failed: %s: %s", out.request_id, type(exc).__name__, exc)
                    if isinstance(exc, TargetUnavailable) and self.metrics is not None:
                        self.metrics.target_errors.inc()
                    self._deliver(h, RequestFailed.of(out.request_id, exc), status="error")
                    continue
                self._observe(out)
                self._deliver(h, out, status="ok" if out.finished else None)
            self._update_gauges()
        self._update_gauges()

    def _deliver(self, h: Handle, event, *, status: str | None) -> None:
        """Hand an event to the request's queue on the event loop; a final one ends the request."""
        if isinstance(event, RequestOutput) and event.new_tokens and h.first_token_at is None:
            h.first_token_at = time.perf_counter()
        final = status is not None
        if final:
            with self._lock:  # submit counts _handles under this lock (re-entrant: callers may hold it)
                self._handles.pop(h.request_id, None)
                self._last_stats.pop(h.request_id, None)
            if self.metrics is not None:
                self.metrics.finished(status, h, event.stats if isinstance(event, RequestOutput) else None)
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(h.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    def _observe(self, out: RequestOutput) -> None:
        """Per-round metrics of one request: tokens by source, escalations and their acceptance lengths."""
        if self.metrics is None:
            return
        self.metrics.count_tokens(out.new_tokens)
        s: RequestStats = out.stats
        ver0, acc0, err0 = self._last_stats.get(out.request_id, (0, 0, 0))
        if out.new_escalation_lengths or s.verified_draft_tokens > ver0:
            self.metrics.escalated(out.new_escalation_lengths, s.verified_draft_tokens - ver0, s.accepted_tokens - acc0)
        if s.target_errors > err0:
            self.metrics.target_errors.inc(s.target_errors - err0)
        self._last_stats[out.request_id] = (s.verified_draft_tokens, s.accepted_tokens, s.target_errors)

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        sched = self.engine.scheduler
        self.metrics.set_occupancy(queue_depth=len(sched.waiting) + len(self._inbox), active_rows=len(sched.running),
                                   rows_free=sched.num_free_rows)

