"""The HTTP app of ``cascade target-serve`` on the project's own runner: the verify endpoint
(``cascade.target_server.wire``) plus the routes a ``--target-url`` client and an operator need.

- ``POST /cascade/v1/verify``, ``GET /cascade/v1/verify`` (capabilities);
- ``GET /v1/models`` (the served name and ``max_model_len``, as vLLM answers it);
- ``GET /health``; ``GET /metrics``: Prometheus, with the prefix cache under vLLM's own names
  (``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total``, tokens) so the panels built for a
  vLLM target read it, and ``cascade_target_verify_calls_total`` / ``..._positions_scored_total``.

With ``api_key`` every ``/v1`` and ``/cascade`` route needs ``Authorization: Bearer <key>``. Every refusal is
in OpenAI's error shape. Importing this module imports FastAPI (the server extra).
Scoring runs on a worker thread (the runner is not async); calls are served one at
a time, each one a single batched forward pass over its sequences.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.exceptions import HTTPException

from cascade.server.protocol import error_body
from cascade.target_server import wire
from cascade.target_server.runner_scorer import RunnerScorer


def _metrics_registry(scorer: RunnerScorer, model: str) -> CollectorRegistry:
    class _Collector:
        def collect(self):
            s = scorer.stats
            for name, doc, value in (
                    ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.queries),
                    ("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache", s.hits),
                    ("cascade_target_verify_calls", "Verify calls served", s.calls),
                    ("cascade_target_positions_scored", "Positions whose log-probs were returned", s.positions_scored)):
                family = CounterMetricFamily(name, doc, labels=["model_name"])
                family.add_metric([model], value)
                yield family

    registry = CollectorRegistry()
    registry.register(_Collector())
    return registry


def create_target_app(scorer: RunnerScorer, *, served_name: str = "target", api_key: str | None = None):
    """The FastAPI app serving ``scorer`` under ``served_name``."""
    app = FastAPI(title="cascade target", docs_url=None, redoc_url=None)
    registry = _metrics_registry(scorer, served_name)
    caps = wire.capabilities(served_name, max_len=scorer.max_len, max_top_k=scorer.max_top_k, full_rows=scorer.full_rows,
                             engine="cascade-runner")

    def refuse(message: str, status: int = 400, *, param: str | None = None, code: str | None = None, headers=None):
        return JSONResponse(error_body(message, param=param, code=code), status_code=status, headers=headers)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key and request.url.path.startswith(("/v1", "/cascade")) and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {api_key}".encode()):
            return refuse("invalid or missing API key: send 'Authorization: Bearer <key>'", 401, code="invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return refuse(str(exc.detail), exc.status_code, code=code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return refuse(f"invalid request: {exc.errors()[:1]}")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        return refuse(f"the target failed: {type(exc).__name__}: {exc}", 500, code="engine_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "cascade",
                                            "max_model_len": scorer.max_len}]}

    @app.get(wire.VERIFY_PATH)
    async def verify_info():
        return caps

    @app.post(wire.VERIFY_PATH)
    async def verify(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return refuse(f"malformed request body: it must be UTF-8 JSON ({type(exc).__name__})")
        try:
            call = wire.parse_request(body, vocab_size=scorer.vocab_size, max_len=scorer.max_len,
                                      max_top_k=scorer.max_top_k, full_rows=scorer.full_rows)
        except ValueError as exc:
            return refuse(str(exc), param=str(exc).split(":", 1)[0])
        if call.model is not None and call.model != served_name:
            return refuse(f"model: {call.model!r} is not served here (this server serves {served_name!r})", 404,
                          param="model", code="model_not_found")
        scored = await asyncio.to_thread(scorer.score, call.prompts, call.last_n, call.top_k)
        return wire.encode_results(served_name, scored)

    app.state.scorer = scorer
    return app


__all__ = ["create_target_app"]
