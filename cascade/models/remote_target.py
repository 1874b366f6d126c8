"""The remote target's HTTP client: one or more target servers (``cascade target-serve``'s verify endpoint,
or a stock ``vllm serve``'s OpenAI route) behind one ``ScoringBackend``, with timeouts, retries with
backoff, round-robin over replicas, failover and a cool-down per failed replica (``RemotePolicy``).
``cascade.models.vllm.remote_target`` wraps it in a ``VLLMRunner``."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from cascade.models.base import TargetUnavailable
from cascade.models.scoring import FULL_ROWS, ScoredPositions

@dataclass(frozen=True)
class RemotePolicy:
    """How the remote path waits, retries and backs off."""

    timeout_s: float = 30.0  # per HTTP call (connect + read)
    retries: int = 2  # extra tries after the first failure
    backoff_s: float = 0.25  # sleep before retry i: backoff_s * 2**i
    cooldown_s: float = 5.0  # after the last try fails, refuse calls at once for this long

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"target_timeout must be > 0 seconds, got {self.timeout_s!r}")
        if self.retries < 0:
            raise ValueError(f"target_retries must be >= 0, got {self.retries!r}")
        if self.backoff_s < 0 or self.cooldown_s < 0:
            raise ValueError("backoff and cooldown must be >= 0 seconds")


class RemoteVLLM:
    """One or more target servers reached over HTTP: ``cascade target-serve`` (its verify endpoint, on vLLM
    or on the project's runner) or a stock ``vllm serve`` (its OpenAI ``/v1/completions``), e.g. replicas of
    a tensor-parallel target. One POST per target pass: the batch's sequences go in one request, which the
    server batches.

    Each replica is probed once for the verify endpoint (``GET /cascade/v1/verify``; probed again after it
    fails, since a restarted replica may be another server). Where it exists a pass sends the sequences and
    the positions to score and the server reads its prefix cache: the pass costs its new positions. A stock
    vLLM server recomputes the whole sequence on every pass (its OpenAI routes read no prefix cache for
    requests with ``prompt_logprobs``). Passes go round-robin over the replicas; a try that fails moves to
    the next healthy replica, and a replica that failed is skipped for ``cooldown_s``."""

    def __init__(self, url: str | Sequence[str], *, model: str | None = None, policy: RemotePolicy = RemotePolicy(),
                 api_key: str | None = None) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("target_url: give at least one URL")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"target_url: must start with http:// or https://, got {u!r}")
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.url = ", ".join(self.urls)  # for messages
        self.policy = policy
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._down_until = [0.0] * len(self.urls)
        self._next = 0
        self._lock = threading.Lock()
        self.calls = 0  # HTTP calls made (retries included)
        self.failures = 0  # target passes that ended in TargetUnavailable
        self.failed_tries = 0  # HTTP tries that failed (a replica down, timing out, answering 5xx), retried or not
        self.passes_per_replica = [0] * len(self.urls)  # successful calls per replica
        self._verify: list[dict | bool | None] = [None] * len(self.urls)  # per replica: its verify capabilities,
        #   False (a stock server), or None (not probed yet)
        self.cached_tokens = 0  # prompt tokens the servers reported reading from their prefix caches
        self.prompt_tokens = 0  # prompt tokens sent
        info = self._model_info(model)
        self.model = info["id"]
        self.max_len = int(info.get("max_model_len") or 2048)

    def _request(self, i: int, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.urls[i] + path, data=data, headers=self.headers,
                                     method="GET" if body is None else "POST")
        self.calls += 1
        with urllib.request.urlopen(req, timeout=self.policy.timeout_s) as resp:
            return json.loads(resp.read())

    def _pick(self, failed: set[int]) -> int | None:
        """The next replica round-robin that is not cooling down, preferring ones not failed in this call."""
        with self._lock:
            now = time.monotonic()
            order = [(self._next + j) % len(self.urls) for j in range(len(self.urls))]
            healthy = [i for i in order if now >= self._down_until[i]]
            fresh = [i for i in healthy if i not in failed]
            choice = (fresh or healthy or [None])[0]
            if choice is not None:
                self._next = (choice + 1) % len(self.urls)
            return choice

    def _mark_down(self, replicas: set[int]) -> None:
        with self._lock:
            for i in replicas:
                self._down_until[i] = time.monotonic() + self.policy.cooldown_s
                self._verify[i] = None  # it may come back as another server

    def verify_capabilities(self, i: int) -> dict | None:
        """Replica ``i``'s verify endpoint (its ``GET /cascade/v1/verify`` answer), or None on a stock vLLM
        server (404 / 405 there); network errors propagate to the caller's retry loop."""
        from cascade.target_server.wire import VERIFY_OBJECT, VERIFY_PATH

        if self._verify[i] is None:
            try:
                caps = self._request(i, VERIFY_PATH)
            except urllib.error.HTTPError as exc:
                if exc.code not in (404, 405):
                    raise
                caps = None
            self._verify[i] = caps if isinstance(caps, dict) and caps.get("object") == VERIFY_OBJECT else False
        return self._verify[i] or None

    def _call(self, path: str | Callable[[int], tuple[str, dict | None]], body: dict | None = None) -> Any:
        """One call with retries over the replicas; raises TargetUnavailable when out of tries or when every
        replica is cooling down after a failure. ``path`` may be a function of the replica that gives the
        path and body (and may itself call the replica, e.g. to probe it)."""
        last: Exception | None = None
        failed: set[int] = set()
        tries = 0
        for attempt in range(self.policy.retries + 1):
            i = self._pick(failed)
            if i is None:
                break
            tries += 1
            if attempt:
                time.sleep(self.policy.backoff_s * 2 ** (attempt - 1))
            try:
                out = self._request(i, *path(i)) if callable(path) else self._request(i, path, body)
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    raise ValueError(f"target {self.urls[i]} refused the request (HTTP {exc.code}): {detail}") from exc
                last = exc
                failed.add(i)
                self.failed_tries += 1
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, json.JSONDecodeError) as exc:
                last = exc
                failed.add(i)
                self.failed_tries += 1
            else:
                self._mark_down(failed)  # the replicas that failed on the way are skipped for a while
                self.passes_per_replica[i] += 1
                return out
        self._mark_down(failed)
        with self._lock:
            self.failures += 1
        if last is None:
            raise TargetUnavailable(f"target {self.url} is marked down (cooling down after a failure)")
        raise TargetUnavailable(f"target {self.url} failed after {tries} tries: {last!r}") from last

    def _model_info(self, model: str | None) -> dict:
        models = self._call("/v1/models").get("data") or []
        if not models:
            raise ValueError(f"target_url: {self.url} serves no model")
        if model is None:
            return models[0]
        for m in models:
            if m.get("id") == model:
                return m
        raise ValueError(f"target_model: {model!r} is not served by {self.url} (it serves {[m.get('id') for m in models]})")

    def score(self, prompts: Sequence[Sequence[int]], last_n: Sequence[int], k: int) -> list[ScoredPositions]:
        from cascade.target_server import wire

        prompts = [list(p) for p in prompts]
        used_verify: list[bool] = []

        def request(i: int) -> tuple[str, dict]:
            caps = self.verify_capabilities(i)
            used_verify[:] = [caps is not None]
            if caps is not None:
                if k == FULL_ROWS and not caps.get("full_rows"):
                    raise ValueError(f"target_logprobs: {self.urls[i]} returns no whole rows (-1); ask for a top-k")
                return wire.VERIFY_PATH, wire.request_body(self.model, prompts, last_n, k)
            if k == FULL_ROWS:
                raise ValueError(f"target_logprobs: whole rows (-1) need the verify endpoint (cascade target-serve); "
                                 f"{self.urls[i]} is a stock vLLM server")
            return "/v1/completions", {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                                       "logprobs": k, "prompt_logprobs": k, "return_tokens_as_token_ids": True}

        answer = self._call(request)
        if used_verify[0]:
            try:
                result = wire.decode_results(answer, last_n)
            except (ValueError, KeyError, TypeError) as exc:
                raise TargetUnavailable(f"target {self.url} sent a malformed verify answer: {exc}") from exc
        else:
            result = self._from_completions(answer, last_n)
        with self._lock:
            self.prompt_tokens += sum(len(p) for p in prompts)
            self.cached_tokens += sum(r.cached_tokens for r in result)
        return result

    def _from_completions(self, answer: dict, last_n: Sequence[int]) -> list[ScoredPositions]:
        """``ScoredPositions`` from a stock ``/v1/completions`` answer with ``prompt_logprobs``."""
        from cascade.models.vllm import _tail  # vLLM's prompt log-probs format, parsed in one place
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        if len(choices) != len(last_n):
            raise TargetUnavailable(f"target {self.url} answered {len(choices)} choices for {len(last_n)} prompts")
        result = []
        for c, n in zip(choices, last_n):
            top = (c.get("logprobs") or {}).get("top_logprobs") or [None]
            scored = _tail(c.get("prompt_logprobs"), top[0] or {}, n)
            if scored is None:
                raise TargetUnavailable(f"target {self.url} returned too few prompt log-probs")
            result.append(scored)
        return result

    def close(self) -> None:
        pass


__all__ = ["RemotePolicy", "RemoteVLLM"]
